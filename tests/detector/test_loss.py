"""Loss assembly: Eq. 8 with mmdetection's weighting, gfl_ops calls, zero positives, collectives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import detector.models.losses as losses_mod
import gfl_ops
from detector.models import VARIANTS, ModelConfig, build_detector
from detector.models.anchors import AnchorGenerator
from detector.models.assigners import atss_assign_batched
from detector.models.losses import DetectionLoss, reduce_mean
from detector.ops.boxes import aligned_giou, bbox2distance, box_centers, giou_loss

BACKENDS = [b for b in ("cpu", "reference") if b in gfl_ops.available_backends("cpu")]
STRIDES = (8, 16, 32, 64, 128)
H, W = 96, 128


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def anchors_for(h: int = H, w: int = W):
    return AnchorGenerator(STRIDES)([(-(-h // s), -(-w // s)) for s in STRIDES])


def some_targets():
    return [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[20.0, 20.0, 44.0, 40.0]]), "labels": torch.tensor([1])},
    ]


def no_targets(batch: int = 2):
    return [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        for _ in range(batch)
    ]


def random_outputs(cfg: ModelConfig, num_anchors: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reg_ch = 4 * (cfg.reg_max + 1) if cfg.use_dfl else 4
    cls = (torch.randn(batch, num_anchors, cfg.num_classes, generator=g) - 2).requires_grad_()
    reg = torch.randn(batch, num_anchors, reg_ch, generator=g).requires_grad_()
    ctr = (
        torch.randn(batch, num_anchors, generator=g).requires_grad_()
        if cfg.with_centerness
        else None
    )
    return cls, reg, ctr


def test_giou_loss_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 1.0]])
    # identical; disjoint with enclosing 3x1 (GIoU = 0 - (3-2)/3); nested, IoU 1/2
    want = torch.tensor([0.0, 1.0 + 1.0 / 3.0, 0.5])
    assert torch.allclose(giou_loss(a, b), want, atol=1e-6)
    assert torch.allclose(aligned_giou(a, b), 1 - want, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_positives_finite_and_connected(variant, backend):
    """No ground truth anywhere: every loss is finite, box losses are 0, and every output still
    receives a (zero) gradient, so DDP without find_unused_parameters does not stall."""
    cfg = ModelConfig(depth=18, num_classes=3, variant=variant, gfl_backend=backend)
    anchors = anchors_for()
    cls, reg, ctr = random_outputs(cfg, anchors.boxes.size(0))
    out = DetectionLoss(cfg)(cls, reg, ctr, anchors, no_targets())
    assert all(torch.isfinite(v) for v in out.values())
    assert out["loss_bbox"] == 0
    if cfg.use_dfl:
        assert out["loss_dfl"] == 0
    out["loss"].backward()
    for t in (cls, reg) + ((ctr,) if ctr is not None else ()):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert cls.grad.abs().sum() > 0  # negatives still train the classifier


def test_zero_positives_from_degenerate_gt():
    cfg = ModelConfig(depth=18, num_classes=3)
    anchors = anchors_for()
    cls, reg, ctr = random_outputs(cfg, anchors.boxes.size(0))
    targets = [
        {"boxes": torch.tensor([[30.0, 30.0, 30.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[500.0, 500.0, 600.0, 600.0]]), "labels": torch.tensor([0])},
    ]
    out = DetectionLoss(cfg)(cls, reg, ctr, anchors, targets)
    assert all(torch.isfinite(v) for v in out.values())


def _positives(cfg, anchors, targets):
    from detector.models.losses import pad_targets

    boxes, labels, valid = pad_targets(targets, cfg.num_classes, torch.device("cpu"))
    assigned = atss_assign_batched(anchors.boxes, anchors.num_level_anchors, boxes, valid)
    b, a = (assigned >= 0).nonzero(as_tuple=True)
    g = assigned[b, a]
    return b, a, boxes[b, g], labels[b, g]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gfl_loss_equals_eq8_on_crafted_outputs(backend):
    """Outputs built so every positive's distribution is the DFL optimum (two-hot at its exact
    distances): the box is exact (GIoU 0, IoU target 1), DFL equals the two-hot entropy, and each
    term has the weighting and normalisation of Eq. 8 / mmdetection."""
    cfg = ModelConfig(depth=18, num_classes=3, gfl_backend=backend)
    anchors = anchors_for()
    targets = some_targets()
    b, a, gt, lab = _positives(cfg, anchors, targets)
    assert b.numel() > 0
    n_bins = cfg.reg_max + 1
    stride = anchors.strides[a][:, None]
    dist = bbox2distance(box_centers(anchors.boxes[a]) / stride, gt / stride)  # (P, 4)
    assert float(dist.max()) < cfg.reg_max - 0.1 and float(dist.min()) > 0
    left = dist.floor().long()
    w_right = dist - left
    probs = torch.zeros(dist.shape + (n_bins,))
    probs.scatter_(-1, left[..., None], (1 - w_right)[..., None])
    probs.scatter_add_(-1, (left + 1)[..., None], w_right[..., None])
    num_anchors = anchors.boxes.size(0)
    reg = torch.zeros(2, num_anchors, 4 * n_bins)
    reg[b, a] = probs.clamp(min=1e-12).log().reshape(-1, 4 * n_bins)
    cls = torch.full((2, num_anchors, 3), -4.0)
    g = torch.Generator().manual_seed(1)
    cls[b, a] = torch.randn(b.numel(), 3, generator=g)  # the max class need not be the GT class

    out = DetectionLoss(cfg)(cls, reg, None, anchors, targets)

    sig = cls.sigmoid()
    weight = sig[b, a].max(dim=1).values
    w_norm = max(float(weight.sum()), 1.0)
    n_pos = max(b.numel(), 1)
    y = torch.zeros_like(sig)
    y[b, a, lab] = 1.0  # the decoded box is exact, so the IoU target is 1
    bce = F.binary_cross_entropy_with_logits(cls, y, reduction="none")
    qfl = ((y - sig).abs().pow(2) * bce).sum() / n_pos
    ent = -(probs * probs.clamp(min=1e-12).log()).sum(-1)  # (P, 4)
    dfl = 0.25 * (ent.mean(dim=1) * weight).sum() / w_norm
    assert out["loss_cls"].item() == pytest.approx(qfl.item(), rel=1e-4)
    assert out["loss_bbox"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["loss_dfl"].item() == pytest.approx(dfl.item(), rel=1e-4, abs=1e-7)
    assert out["loss"].item() == pytest.approx(
        out["loss_cls"].item() + out["loss_bbox"].item() + out["loss_dfl"].item(), rel=1e-6
    )


def test_losses_call_gfl_ops_with_mmdetection_arguments(monkeypatch):
    calls = {}

    def spy(name):
        real = getattr(gfl_ops, name)

        def wrapper(*args, **kwargs):
            calls.setdefault(name, []).append((args, kwargs))
            return real(*args, **kwargs)

        return wrapper

    for name in ("quality_focal_loss", "distribution_focal_loss", "integral"):
        monkeypatch.setattr(gfl_ops, name, spy(name))
    cfg = ModelConfig(depth=18, num_classes=3, gfl_backend="reference")
    anchors = anchors_for(64, 512)
    cls, reg, _ = random_outputs(cfg, anchors.boxes.size(0))
    # a long thin GT matches small anchors best (P3), yet reaches 32 strides from their centres:
    # its DFL targets hit the clamp
    targets = [
        {"boxes": torch.tensor([[0.0, 30.0, 512.0, 38.0]]), "labels": torch.tensor([2])},
        some_targets()[1],
    ]
    DetectionLoss(cfg)(cls, reg, None, anchors, targets)

    ((args, kw),) = calls["quality_focal_loss"]
    labels, scores = args[1]
    assert kw["beta"] == 2.0 and kw["backend"] == "reference" and kw["reduction"] == "mean"
    assert isinstance(kw["avg_factor"], torch.Tensor) and kw["avg_factor"].dim() == 0
    pos = labels < 3
    assert float(kw["avg_factor"]) == float(pos.sum())
    assert bool((scores[~pos] == 0).all()) and bool((scores[pos] > 0).all())
    ((args, kw),) = calls["distribution_focal_loss"]
    pred, target, weight = args
    assert pred.shape[1] == 17 and target.shape == weight.shape == (pred.shape[0],)
    assert float(target.max()) == pytest.approx(16 - 0.1) and float(target.min()) >= 0
    assert kw["avg_factor"] == 4.0
    # the weight of each positive is repeated for its 4 sides
    assert torch.equal(weight.view(-1, 4), weight.view(-1, 4)[:, :1].expand(-1, 4))
    assert calls["integral"][0][0][0].shape[1:] == (4, 17)

    # an image without positives counts as one in the normaliser (mmdetection's max(n_i, 1))
    DetectionLoss(cfg)(cls, reg, None, anchors, [targets[0], no_targets(1)[0]])
    (args, kw) = calls["quality_focal_loss"][1]
    assert float(kw["avg_factor"]) == float((args[1][0] < 3).sum()) + 1


def test_padding_anchors_are_ignored(monkeypatch):
    captured = {}
    real = gfl_ops.quality_focal_loss

    def spy(pred, target, weight=None, **kw):
        captured["weight"], captured["labels"] = weight, target[0]
        return real(pred, target, weight, **kw)

    monkeypatch.setattr(gfl_ops, "quality_focal_loss", spy)
    torch.manual_seed(0)
    model = build_detector(depth=18, num_classes=3, fpn_channels=32, feat_channels=32, gn_groups=8)
    targets = some_targets()
    targets[1]["image_size"] = (48, 64)  # image 1 fills the top-left quarter only
    out = model(torch.randn(2, 3, H, W), targets)
    assert torch.isfinite(out["loss"])
    gen = model.anchor_generator
    anchors = gen([(-(-H // s), -(-W // s)) for s in STRIDES])
    valid = gen.valid_flags(anchors, torch.tensor([[H, W], [48, 64]])).reshape(-1)
    assert torch.equal(captured["weight"], valid.float())
    assert bool((captured["labels"][~valid] == 3).all())


class FakeDist:
    """Stands in for torch.distributed on 2 ranks whose other rank holds identical values."""

    def __init__(self):
        self.calls = []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, t):
        self.calls.append(t.shape)
        t.mul_(2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_collective_per_step_with_or_without_positives(monkeypatch, variant):
    fake = FakeDist()
    monkeypatch.setattr(losses_mod, "dist", fake)
    cfg = ModelConfig(depth=18, num_classes=3, variant=variant)
    anchors = anchors_for()
    crit = DetectionLoss(cfg)
    for targets in (some_targets(), no_targets()):
        cls, reg, ctr = random_outputs(cfg, anchors.boxes.size(0))
        crit(cls, reg, ctr, anchors, targets)
    assert fake.calls == [torch.Size([2]), torch.Size([2])]
    # identical ranks: the mean is the local value
    t = torch.tensor([3.0, 0.5])
    assert torch.equal(reduce_mean(t), t)


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = ModelConfig(depth=18, num_classes=3)
        anchors = anchors_for()
        cls, reg, _ = random_outputs(cfg, anchors.boxes.size(0), seed=rank)
        # rank 1 has no ground truth at all: it must still join the collective
        targets = some_targets() if rank == 0 else no_targets()
        out = DetectionLoss(cfg)(cls, reg, None, anchors, targets)
        out["loss"].backward()
        queue.put((rank, {k: v.item() for k, v in out.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_with_an_empty_rank(tmp_path):
    """nanodet#422: a rank without positives must not skip the normalisers' all_reduce."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert set(results) == {0, 1}
    assert all(math.isfinite(v) for r in results.values() for v in r.values())
    assert results[1]["loss_bbox"] == 0.0 and results[0]["loss_bbox"] > 0.0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_a_step(variant):
    torch.manual_seed(0)
    model = build_detector(
        depth=18, num_classes=3, variant=variant, fpn_channels=32, feat_channels=32, gn_groups=8
    ).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = model.head.reg_out.weight.detach().clone()
    out = model(torch.randn(2, 3, 64, 64), some_targets())
    assert set(out) == set(model.loss_names)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    opt.step()
    assert not torch.equal(before, model.head.reg_out.weight)
    assert model.backbone.conv1.weight.grad is None  # frozen stem


def test_bf16_autocast_losses_are_fp32_and_finite():
    torch.manual_seed(0)
    model = build_detector(
        depth=18, num_classes=3, fpn_channels=32, feat_channels=32, gn_groups=8
    ).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64), some_targets())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_bad_targets_are_reported():
    cfg = ModelConfig(depth=18, num_classes=3)
    anchors = anchors_for()
    cls, reg, _ = random_outputs(cfg, anchors.boxes.size(0))
    bad = some_targets()
    bad[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        DetectionLoss(cfg)(cls, reg, None, anchors, bad)
    with pytest.raises(ValueError, match="2 targets for a batch of 3"):
        DetectionLoss(cfg)(torch.zeros(3, *cls.shape[1:]), reg, None, anchors, some_targets())
