"""The mmdet adapter in mmdet's other detectors with a quality focal loss: RTMDet and TOOD.

test_mmdet.py covers the GFL head, whose QFL, DFL and integral the adapter was written for.
mmdetection's most used detector today, RTMDet, and TOOD also train on ``QualityFocalLoss``, each
calling it its own way:

* RTMDet (``RTMDetSepBNHead``): logits, ``(labels, assign_metrics)`` targets from its dynamic
  soft-label assigner, per-anchor label weights and ``avg_factor=1.0`` (it divides later).
  Built here from mmdet's own shipped ``configs/rtmdet/rtmdet_tiny_8xb32-300e_coco.py``, whole
  detector, with SyncBN reverted to BN as mmengine's Runner does on one device.
* TOOD (``TOODHead``): ``activated=True`` -- probabilities, the geometric mean of two sigmoid
  branches -- with ``(labels, alignment_metrics)`` targets, after ``initial_epoch`` epochs of a
  focal loss.  Its forward samples with ``mmcv.ops.deform_conv2d``, which mmcv-lite lacks (and
  the test stand-in for mmcv's ``_ext`` does not provide), so its loss is run on head outputs
  made here (probabilities and boxes shaped as the head emits them).

For each, stock vs ``fuse``-converted (and, for RTMDet, vs a config naming
``FusedQualityFocalLoss``): losses rel 1e-5, gradients rel L2 1e-4, three SGD steps, state dicts
and strict loading both ways, predictions.
"""

from __future__ import annotations

import copy
import os

import mmcv_ext_stub
import pytest
import torch

mmcv_ext_stub.install()  # before anything imports mmdet.models (which imports mmcv.ops)

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmdet_testing import (  # noqa: E402
    assert_losses_equal,
    assert_predictions_equal,
    autocast_steps,
    data_samples,
    flat,
    rel_l2,
    tiny_coco_run,
    total,
    train_and_test,
)
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from gfl_ops.integrations.mmdet import FusedQualityFocalLoss, fuse  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")
SIZE = 256  # image side, pixels
NUM_CLASSES = 80


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # the comparisons are exact enough either way; one thread keeps CI's 2 cores for xdist
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    register_all_modules(init_default_scope=False)
    yield
    torch.set_num_threads(threads)


def _config(path: str) -> Config:
    cfg = Config.fromfile(os.path.join(CONFIGS, path))
    cfg.model.backbone.init_cfg = None  # no pretrained download: weights come from the seed
    return cfg


def _build(model_cfg) -> torch.nn.Module:
    # the data preprocessor is looked up in the default scope; no global scope is set here
    with DefaultScope.overwrite_default_scope("mmdet"):
        return revert_sync_batchnorm(MODELS.build(model_cfg))


def _gt_instances(
    gen: torch.Generator, boxes: int = 6, size: int = SIZE, spread: float = 2.5
) -> InstanceData:
    """Boxes of many sizes, size/16 to size/16 * e^spread (positives on several levels)."""
    wh = torch.exp(torch.rand(boxes, 2, generator=gen) * spread) * size / 16
    wh = wh.clamp(max=size - 8)
    xy = torch.rand(boxes, 2, generator=gen) * (size - wh)
    labels = torch.randint(0, NUM_CLASSES, (boxes,), generator=gen)
    return InstanceData(bboxes=torch.cat([xy, xy + wh], 1), labels=labels)


def _images_and_samples(seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.rand(batch, 3, SIZE, SIZE, generator=gen) * 255
    return inputs, data_samples([_gt_instances(gen) for _ in range(batch)], SIZE)


def _assert_same_parameters(fused: torch.nn.Module, stock: torch.nn.Module, attr: str) -> None:
    for (name, p_s), p_f in zip(stock.named_parameters(), fused.parameters()):
        a, b = getattr(p_f, attr), getattr(p_s, attr)
        if attr == "grad" and b is None:
            assert a is None, name
            continue
        assert rel_l2(a.detach(), b.detach()) <= 1e-4, name


# --------------------------------------------------------------------------------------------
# RTMDet, whole detector from mmdet's shipped config


def _spread_rtmdet_outputs(detector: torch.nn.Module) -> None:
    """Realistic, not random-init, outputs: mmdet's init puts every class logit at about -4.6
    (prior 0.01), which would hide a layout bug (classes vs anchors); these give a spread of
    about 1.4 around -2.5, so some anchors score high for some classes."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in detector.bbox_head.rtm_cls:
            conv.weight.normal_(0, 0.05, generator=gen)
            conv.bias.normal_(-2.5, 1.0, generator=gen)
        for conv in detector.bbox_head.rtm_reg:  # distances of 2-4 strides: boxes that overlap
            conv.weight.normal_(0, 0.02, generator=gen)
            conv.bias.uniform_(2.0, 4.0, generator=gen)


@pytest.fixture(scope="module")
def rtmdet_tiny() -> tuple[torch.nn.Module, torch.nn.Module, Config]:
    """(stock RTMDet-tiny, a deepcopy of it converted by ``fuse``, the config), one init."""
    cfg = _config("rtmdet/rtmdet_tiny_8xb32-300e_coco.py")
    assert cfg.model.bbox_head.loss_cls.type == "QualityFocalLoss"
    torch.manual_seed(0)
    stock = _build(cfg.model)
    _spread_rtmdet_outputs(stock)
    return stock, fuse(copy.deepcopy(stock)), cfg


def test_rtmdet_fuse_converts_its_quality_focal_loss(rtmdet_tiny):
    stock, fused, cfg = rtmdet_tiny
    stock_modules = dict(stock.named_modules())
    converted = {
        n: type(m) for n, m in fused.named_modules() if type(m) is not type(stock_modules[n])
    }
    assert converted == {"bbox_head.loss_cls": FusedQualityFocalLoss}
    head_cfg = cfg.model.bbox_head.loss_cls
    assert (fused.bbox_head.loss_cls.beta, fused.bbox_head.loss_cls.loss_weight) == (
        head_cfg.beta,
        head_cfg.loss_weight,
    )


def test_rtmdet_losses_gradients_and_sgd_match_mmdet(rtmdet_tiny):
    stock, fused, _ = (copy.deepcopy(m) for m in rtmdet_tiny)
    # the control for the SGD steps below: the stock model with its weights moved by float32
    # rounding (relative 1e-7)
    rounded = copy.deepcopy(stock)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in rounded.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=gen))
    models = (stock, fused, rounded)
    for model in models:
        model.train()
    inputs, samples = _images_and_samples(seed=3)

    want = stock.loss(inputs, samples)
    # the comparison means something: a box loss on every level, i.e. positives there
    assert all(float(w) > 0 for w in want["loss_bbox"]), want
    got = fused.loss(inputs, samples)
    assert_losses_equal(got, want)
    total(want).backward()
    total(got).backward()
    _assert_same_parameters(fused, stock, "grad")

    # Three SGD steps.  A whole detector in training mode (batch-norm statistics, SiLU, the
    # dynamic assigner) amplifies any difference: the rounding-level control above ends its
    # third step ~5e-4 (relative L2) away from the stock weights, per parameter up to ~1e-1 for
    # batch-norm weights whose gradient is a near-cancelling sum.  So the fused run is held to
    # the whole weight vector, and to staying about as close to stock as rounding does (seen
    # here: weights 7e-6 vs the control's 2e-4, the loss 1e-4 vs 9e-3).
    opts = [torch.optim.SGD(m.parameters(), lr=0.004, momentum=0.9) for m in models]
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            total(model.loss(inputs, samples)).backward()
            opt.step()
    fused_drift = rel_l2(flat(fused, "data"), flat(stock, "data"))
    rounding_drift = rel_l2(flat(rounded, "data"), flat(stock, "data"))
    assert fused_drift <= 1e-4 and fused_drift < rounding_drift, (fused_drift, rounding_drift)
    want = float(total(stock.loss(inputs, samples)))
    fused_off = abs(float(total(fused.loss(inputs, samples))) - want) / want
    rounding_off = abs(float(total(rounded.loss(inputs, samples))) - want) / want
    assert fused_off <= 1e-2 and fused_off < 2 * rounding_off, (fused_off, rounding_off)


def test_rtmdet_built_from_a_fused_config_and_checkpoints(rtmdet_tiny):
    """The config route (``loss_cls=dict(type='FusedQualityFocalLoss', ...)``) and checkpoints:
    a stock RTMDet state dict loads strictly into the fused model and back, unchanged."""
    stock, fused, cfg = rtmdet_tiny
    sd_s, sd_f = stock.state_dict(), fused.state_dict()
    assert list(sd_s) == list(sd_f) and all(torch.equal(sd_s[k], sd_f[k]) for k in sd_s)

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.bbox_head.loss_cls.type = "FusedQualityFocalLoss"
    from_config = _build(model_cfg)
    assert type(from_config.bbox_head.loss_cls) is FusedQualityFocalLoss
    from_config.load_state_dict(sd_s, strict=True)
    back = _build(cfg.model)
    back.load_state_dict(from_config.state_dict(), strict=True)
    assert all(torch.equal(v, sd_s[k]) for k, v in back.state_dict().items())

    from_config.train()
    stock = copy.deepcopy(stock).train()
    inputs, samples = _images_and_samples(seed=4)
    assert_losses_equal(from_config.loss(inputs, samples), stock.loss(inputs, samples))


def test_rtmdet_predictions_equal(rtmdet_tiny):
    stock, fused, _ = rtmdet_tiny
    assert_predictions_equal(fused, stock, *_images_and_samples(seed=5))


def test_rtmdet_under_autocast(rtmdet_tiny):
    """Mixed precision (bf16 autocast, what AMP runs on a CPU): finite losses of the same dtype
    as stock's and close to them, finite gradients, and a step that differs from stock's far
    less than mixed precision itself makes it differ from the float32 step."""
    stock, fused = (copy.deepcopy(m).train() for m in rtmdet_tiny[:2])
    inputs, samples = _images_and_samples(seed=6)
    losses, fused_vs_stock, amp_vs_float32 = autocast_steps(stock, fused, inputs, samples)
    for key in losses["stock"]:
        for g, w in zip(losses["fused"][key], losses["stock"][key]):
            assert g.dtype == w.dtype and torch.isfinite(g), key
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    assert fused_vs_stock < 0.2 * amp_vs_float32, (fused_vs_stock, amp_vs_float32)


def _shrink_images(pipeline: list, side: int) -> None:
    """Scale a pipeline's image sizes from RTMDet's 640 (and 1280) pixels to ``side``."""
    for step in pipeline:
        for key in ("img_scale", "scale", "crop_size", "size"):
            if isinstance(step.get(key), (tuple, list)):
                step[key] = tuple(side * v // 640 for v in step[key])


def test_rtmdet_config_file_trains_fused_with_the_hook(tmp_path) -> None:
    """mmdet's own ``configs/rtmdet/rtmdet_tiny_8xb32-300e_coco.py`` with the two lines a user
    adds (the import, ``FuseGFLOpsHook`` appended to the config's own custom hooks) runs in
    mmengine's Runner as ``tools/train.py`` runs it: RTMDet's own pipeline (mosaic, mix-up),
    its EMA hook (ExpMomentumEMA), the real COCO dataset and evaluator on a tiny COCO-format
    dataset.  Every training step runs the fused QFL, in the model and its EMA copy.  (Shrunk
    for a CPU test: 96-pixel images, one epoch of two iterations.)"""
    from mmengine.hooks import EMAHook

    cfg = _config("rtmdet/rtmdet_tiny_8xb32-300e_coco.py")
    # what a user adds
    cfg.custom_imports = dict(imports=["gfl_ops.integrations.mmdet"], allow_failed_imports=False)
    cfg.custom_hooks.append(dict(type="FuseGFLOpsHook"))
    # what makes it a CPU test
    tiny_coco_run(cfg, tmp_path, lambda pipeline: _shrink_images(pipeline, 96))
    for hook in cfg.custom_hooks:
        _shrink_images(hook.get("switch_pipeline", []), 96)
    runner, calls, metrics = train_and_test(cfg, lambda model: model.bbox_head.loss_cls)
    # 3 levels x 2 iterations, every one fused
    assert len(calls) >= 6 and set(calls) == {FusedQualityFocalLoss}
    (ema,) = [h for h in runner.hooks if isinstance(h, EMAHook)]
    assert type(ema.ema_model.module.bbox_head.loss_cls) is FusedQualityFocalLoss
    assert "coco/bbox_mAP" in metrics  # pycocotools evaluated the fused model's detections


# --------------------------------------------------------------------------------------------
# TOOD: QFL on probabilities (activated=True)


def _tood_head() -> torch.nn.Module:
    cfg = _config("tood/tood_r50_fpn_1x_coco.py")
    head = copy.deepcopy(cfg.model.bbox_head)
    assert head.loss_cls.type == "QualityFocalLoss" and head.loss_cls.activated
    head.update(train_cfg=cfg.model.train_cfg, test_cfg=cfg.model.test_cfg)
    return MODELS.build(head)


TOOD_SIZE = 512  # its five levels reach stride 128


def _tood_outputs(head: torch.nn.Module, seed: int) -> tuple[list, list]:
    """What TOODHead.forward emits, per level: class probabilities (N, C, H, W), spread as a
    trained head's are, and boxes (N, 4, H, W) in stride units around each anchor centre."""
    gen = torch.Generator().manual_seed(seed)
    scores, boxes = [], []
    for stride in head.prior_generator.strides:
        h = w = TOOD_SIZE // stride[0]
        logits = torch.randn(2, NUM_CLASSES, h, w, generator=gen) * 1.4 - 3.0
        scores.append(logits.sigmoid().requires_grad_())
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        centre = torch.stack([xs, ys, xs, ys]).expand(2, 4, h, w)
        dist = torch.exp(torch.randn(2, 4, h, w, generator=gen) * 0.5 + 0.7)
        sign = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1)
        boxes.append((centre + sign * dist).requires_grad_())
    return scores, boxes


def test_tood_head_activated_qfl_losses_and_gradients_match_mmdet():
    torch.manual_seed(0)
    stock = _tood_head()
    fused = fuse(copy.deepcopy(stock))
    assert type(fused.loss_cls) is FusedQualityFocalLoss and fused.loss_cls.activated
    assert type(fused.initial_loss_cls) is type(stock.initial_loss_cls)  # a focal loss: kept
    gen = torch.Generator().manual_seed(7)
    gts = [_gt_instances(gen, boxes=8, size=TOOD_SIZE, spread=2.8) for _ in range(2)]
    shape = (TOOD_SIZE, TOOD_SIZE)
    metas = [dict(img_shape=shape, pad_shape=shape, scale_factor=(1.0, 1.0))] * 2

    # TOOD reads the epoch off mmengine's message hub (set by the Runner): the focal-loss
    # warm-up, then QFL
    hub = MessageHub.get_current_instance()
    qfl_calls: list[int] = []
    fused.loss_cls.register_forward_hook(lambda *_: qfl_calls.append(1))
    for epoch in (0, stock.initial_epoch):
        hub.update_info("epoch", epoch)
        qfl_calls.clear()
        scores, boxes = _tood_outputs(stock, seed=epoch + 11)
        f_scores = [s.detach().clone().requires_grad_() for s in scores]
        f_boxes = [b.detach().clone().requires_grad_() for b in boxes]
        want = stock.loss_by_feat(scores, boxes, gts, metas)
        got = fused.loss_by_feat(f_scores, f_boxes, gts, metas)
        # positives on several of the five levels
        assert sum(float(w) > 0 for w in want["loss_bbox"]) >= 3, (epoch, want)
        assert_losses_equal(got, want)
        total(want).backward()
        total(got).backward()
        for g, w in zip(f_scores + f_boxes, scores + boxes):
            assert rel_l2(g.grad, w.grad) <= 1e-4, epoch
        # the fused QFL ran on every level once the warm-up was over
        assert len(qfl_calls) == (0 if epoch < stock.initial_epoch else 5), epoch
