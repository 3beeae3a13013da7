"""gfl_ops.integrations.mmdet against the real mmdet 3.x package (never a re-implementation).

* registration, constructor arguments and attributes, ``fuse``;
* mmdet's own unit tests for QFL / DFL / the GFL head, re-expressed here and run on both the
  stock mmdet class and ours;
* a semantics grid: fused == stock in value, shape, dtype and gradients for every weight /
  reduction / ``avg_factor`` form mmdet accepts, the errors mmdet raises, and the documented
  deliberate differences (empty mean, DFL target == reg_max, 16-bit dtypes, dense-target
  gradient at zero entries);
* a GFLHead with the loss configuration of mmdet's ``configs/gfl/gfl_r50_fpn_1x_coco.py`` and a
  whole GFL detector: losses, gradients, three SGD steps, predictions and checkpoints, stock vs
  fused.

mmdet is imported at module level on purpose: without it this file fails instead of skipping.
The environment has mmcv-lite (no compiled ops), so ``mmcv._ext`` is stood in for by the
test-only ``mmcv_ext_stub`` before mmdet's models are imported.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import mmcv_ext_stub
import pytest
import torch

mmcv_ext_stub.install()  # before anything imports mmdet.models (which imports mmcv.ops)

import mmdet  # noqa: E402
from mmdet.models.dense_heads import GFLHead  # noqa: E402
from mmdet.models.dense_heads.gfl_head import Integral  # noqa: E402
from mmdet.models.losses import DistributionFocalLoss, QualityFocalLoss  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet_testing import (  # noqa: E402
    assert_losses_equal,
    assert_predictions_equal,
    autocast_steps,
    data_samples,
    rel_l2,
    this_process_mp_cfg,
    tiny_coco_run,
    torch_threads_kept,
    total,
    train_and_test,
)
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from gfl_ops import reference  # noqa: E402
from gfl_ops.integrations.mmdet import (  # noqa: E402
    FusedDistributionFocalLoss,
    FusedIntegral,
    FusedQualityFocalLoss,
    fuse,
)

assert mmdet.__version__.startswith("3."), mmdet.__version__

QFL_CLASSES = [
    pytest.param(QualityFocalLoss, id="mmdet"),
    pytest.param(FusedQualityFocalLoss, id="fused"),
]
DFL_CLASSES = [
    pytest.param(DistributionFocalLoss, id="mmdet"),
    pytest.param(FusedDistributionFocalLoss, id="fused"),
]

# loss values and gradients, fused kernels vs mmdet's eager formulas
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Run this module's (mostly tiny) tensors on one intra-op thread.  On a shared 2-core
    machine a 2-thread OpenMP region waits out a scheduler slice whenever the other core is
    busy: measured 12 ms instead of 0.04 ms per 41x17 cross_entropy in mmdet's DFL, 70 s
    instead of 10 s for this file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# helpers


def _outcome(
    fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict
) -> tuple[torch.Tensor | None, Exception | None]:
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - the exception itself is what is compared
        return None, err


def _assert_same(
    stock: Callable[..., torch.Tensor],
    fused: Callable[..., torch.Tensor],
    args: tuple,
    kwargs: dict | None = None,
    *,
    wrt: tuple[torch.Tensor, ...],
    tol: dict,
    what: str = "",
) -> None:
    """``stock(*args, **kwargs)`` and ``fused(*args, **kwargs)`` raise the same exception type,
    or give the same shape, dtype, values and gradients (with respect to ``wrt``)."""
    want, want_err = _outcome(stock, args, kwargs or {})
    got, got_err = _outcome(fused, args, kwargs or {})
    if want_err is not None:
        assert got_err is not None and type(got_err) is type(want_err), (
            f"{what}: mmdet raised {want_err!r}, fused gave {got_err!r}"
        )
        return
    assert got_err is None, f"{what}: fused raised {got_err!r} where mmdet did not"
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {tuple(got.shape)} {got.dtype} vs mmdet {tuple(want.shape)} {want.dtype}"
    )
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
    if not want.requires_grad:
        return
    cotangent = torch.linspace(0.5, 1.5, want.numel(), dtype=want.dtype).reshape(want.shape)
    g_want = torch.autograd.grad((want * cotangent).sum(), wrt, allow_unused=True)
    g_got = torch.autograd.grad((got * cotangent).sum(), wrt, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        assert (a is None) == (b is None), f"{what}: gradient {i} present in one only"
        if a is None:
            continue
        # gradient entries near 0 are differences of O(max) terms: their error scales with the
        # largest entry (avg_factor=0 scales everything by 1/eps), so atol does too
        scale = b.abs().max().item() if b.numel() else 0.0
        atol = max(tol["atol"], 0.1 * tol["rtol"] * scale)
        torch.testing.assert_close(
            a, b, rtol=tol["rtol"], atol=atol, msg=lambda m, i=i: f"{what} grad {i}: {m}"
        )
        assert rel_l2(a, b) <= tol["rtol"], f"{what} grad {i}: relative L2 {rel_l2(a, b)}"


def _qfl_inputs(n: int, c: int, dtype: torch.dtype, activated: bool, seed: int = 0):
    """pred (N, C) leaf, labels with -1 / C / C+3 backgrounds, scores (N,), dense (N, C)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=dtype) * 3
    pred = (logits.sigmoid() if activated else logits).requires_grad_(True)
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[: min(n, 8)] = torch.tensor([-1, c, c + 3, -1, c, 0, c - 1, c + 3])[: min(n, 8)]
    scores = torch.rand(n, generator=gen, dtype=dtype)
    dense = torch.rand(n, c, generator=gen, dtype=dtype) * (torch.rand(n, c, generator=gen) > 0.7)
    return pred, labels, scores, dense


def _dfl_inputs(m: int, bins: int, dtype: torch.dtype, seed: int = 0):
    """pred (M, bins) leaf, targets in [0, bins-1) including integers (0, 3)."""
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.randn(m, bins, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    target = torch.rand(m, generator=gen, dtype=dtype) * (bins - 1 - 1e-3)
    target[:2] = torch.tensor([0.0, 3.0], dtype=dtype)[: min(m, 2)]
    return pred, target


def _avg_factors(dtype: torch.dtype) -> list:
    return [None, 3.5, 7, 0, torch.tensor(5.5, dtype=dtype), torch.tensor([5.5], dtype=dtype)]


def _weights(n: int, dtype: torch.dtype) -> list:
    gen = torch.Generator().manual_seed(7)
    return [
        None,
        torch.rand(n, generator=gen, dtype=dtype).requires_grad_(True),
        torch.rand(n, 1, generator=gen, dtype=dtype),
    ]  # mmdet broadcasts: (N,)*(N,1)


REDUCTIONS = ("mean", "sum", "none")
OVERRIDES = (None, "none", "mean", "sum")


# --------------------------------------------------------------------------------------------
# registration, construction


def test_import_gfl_ops_does_not_import_mmdet():
    code = (
        "import sys, gfl_ops, gfl_ops.integrations; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', "
        "'mmengine')); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registered_in_mmdet_models_with_mmdet_constructors():
    for name, cls, stock in [
        ("FusedQualityFocalLoss", FusedQualityFocalLoss, QualityFocalLoss),
        ("FusedDistributionFocalLoss", FusedDistributionFocalLoss, DistributionFocalLoss),
        ("FusedIntegral", FusedIntegral, Integral),
    ]:
        assert MODELS.get(name) is cls
        assert issubclass(cls, stock)  # mmdet heads test isinstance(loss_cls, QualityFocalLoss)

    cfg = dict(use_sigmoid=True, beta=1.5, reduction="sum", loss_weight=0.5, activated=True)
    ours, theirs = MODELS.build(dict(type="FusedQualityFocalLoss", **cfg)), QualityFocalLoss(**cfg)
    for attr in cfg:
        assert getattr(ours, attr) == getattr(theirs, attr)
    ours = MODELS.build(dict(type="FusedDistributionFocalLoss", reduction="none", loss_weight=0.25))
    assert (ours.reduction, ours.loss_weight) == ("none", 0.25)
    assert FusedQualityFocalLoss().beta == QualityFocalLoss().beta == 2.0
    assert (
        MODELS.build(dict(type="FusedQualityFocalLoss", backend="reference")).backend == "reference"
    )

    ours, theirs = MODELS.build(dict(type="FusedIntegral", reg_max=7)), Integral(7)
    assert ours.reg_max == 7
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"project"}
    assert torch.equal(ours.project, theirs.project)
    assert "project" not in ours._non_persistent_buffers_set


def test_mmcv_ext_stand_in_is_inert():
    """The test-only mmcv._ext stand-in (when in use) computes nothing mmcv would compute
    differently: nms is torchvision's, every other compiled op refuses to run."""
    import mmcv._ext
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torch.equal(
        mmcv._ext.nms(boxes, scores, iou_threshold=0.5, offset=0),
        torchvision.ops.nms(boxes, scores, 0.5),
    )
    if not mmcv_ext_stub.is_stub(mmcv._ext):  # full mmcv installed: its real ops are in use
        return
    with pytest.raises(NotImplementedError, match="roi_align_forward"):
        mmcv._ext.roi_align_forward(boxes)
    with pytest.raises(NotImplementedError, match="offset=1"):
        mmcv._ext.nms(boxes, scores, iou_threshold=0.5, offset=1)


@pytest.mark.parametrize("cls", QFL_CLASSES)
def test_use_sigmoid_false_fails_as_in_mmdet(cls):
    with pytest.raises(AssertionError):
        cls(use_sigmoid=False)
    loss = cls()
    loss.use_sigmoid = False  # changed after construction: mmdet's forward raises
    pred, labels, scores, _ = _qfl_inputs(4, 3, torch.float32, False)
    with pytest.raises(NotImplementedError):
        loss(pred, (labels, scores))


# --------------------------------------------------------------------------------------------
# mmdet's own unit tests, each run on mmdet's class and ours


@pytest.mark.parametrize("cls", QFL_CLASSES + DFL_CLASSES)
def test_upstream_loss_with_reduction_override(cls):
    # mmdet tests/test_models/test_losses/test_loss.py::test_loss_with_reduction_override
    pred = torch.rand(10, 4)
    target = (torch.rand(10, 4),)
    with pytest.raises(AssertionError):
        cls()(pred, target, None, reduction_override=True)


@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("cls", QFL_CLASSES)
def test_upstream_quality_focal_loss_tuple_and_tensor_target(cls, activated):
    # mmdet tests/test_models/test_losses/test_loss.py::test_QualityFocalLoss_Loss
    torch.manual_seed(0)
    pred = torch.rand(4, 5)
    label = torch.tensor([0, 1, 2, 0])
    quality = torch.rand(4)
    from_tuple = cls(activated=activated)(pred, (label, quality))
    assert isinstance(from_tuple, torch.Tensor)
    one_hot = torch.nn.functional.one_hot(label, 5) * quality.reshape(4, 1)
    from_tensor = cls(activated=activated)(pred, one_hot)
    assert isinstance(from_tensor, torch.Tensor)
    assert from_tensor == from_tuple


def _upstream_gfl_head(fused: bool) -> GFLHead:
    torch.manual_seed(0)
    head = GFLHead(
        num_classes=4,
        in_channels=1,
        train_cfg=dict(
            assigner=dict(type="ATSSAssigner", topk=9),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        anchor_generator=dict(
            type="AnchorGenerator",
            ratios=[1.0],
            octave_base_scale=8,
            scales_per_octave=1,
            strides=[8, 16, 32, 64, 128],
        ),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
    )
    return fuse(head) if fused else head


@pytest.mark.parametrize("fused", [False, True], ids=["mmdet", "fused"])
def test_upstream_gfl_head_loss(fused):
    # mmdet tests/test_models/test_dense_heads/test_gfl_head.py::test_gfl_head_loss (mmdet 3.x
    # API: InstanceData ground truth, loss_by_feat)
    s = 256
    img_metas = [{"img_shape": (s, s, 3), "scale_factor": 1, "pad_shape": (s, s, 3)}]
    head = _upstream_gfl_head(fused)
    assert isinstance(head.loss_cls, FusedQualityFocalLoss) == fused
    feats = [torch.rand(1, 1, s // k, s // k) for k in [4, 8, 16, 32, 64]]
    cls_scores, bbox_preds = head.forward(feats)

    # empty ground truth: the cls loss is non-zero, no box losses
    empty = InstanceData(bboxes=torch.empty((0, 4)), labels=torch.LongTensor([]))
    losses = head.loss_by_feat(cls_scores, bbox_preds, [empty], img_metas)
    assert sum(losses["loss_cls"]).item() > 0
    assert sum(losses["loss_bbox"]).item() == 0
    assert sum(losses["loss_dfl"]).item() == 0

    # one ground-truth box: every loss is non-zero
    one = InstanceData(
        bboxes=torch.Tensor([[23.6667, 23.8757, 238.6326, 151.8874]]), labels=torch.LongTensor([2])
    )
    losses = head.loss_by_feat(cls_scores, bbox_preds, [one], img_metas)
    assert sum(losses["loss_cls"]).item() > 0
    assert sum(losses["loss_bbox"]).item() > 0
    assert sum(losses["loss_dfl"]).item() > 0


# --------------------------------------------------------------------------------------------
# semantics grid: fused == stock


@pytest.mark.parametrize("beta,loss_weight", [(2.0, 1.0), (1.5, 0.25)])
@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("kind", ["tuple", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qfl_grid_matches_mmdet(dtype, kind, activated, beta, loss_weight):
    n, c = 37, 7
    pred, labels, scores, dense = _qfl_inputs(n, c, dtype, activated)
    target = (labels, scores) if kind == "tuple" else dense
    for reduction in REDUCTIONS:
        kw = dict(beta=beta, loss_weight=loss_weight, activated=activated, reduction=reduction)
        stock, fused = QualityFocalLoss(**kw), FusedQualityFocalLoss(**kw)
        for override in OVERRIDES:
            for avg in _avg_factors(dtype):
                for weight in _weights(n, dtype):
                    wrt = (pred,) if weight is None or not weight.requires_grad else (pred, weight)
                    _assert_same(
                        stock,
                        fused,
                        (pred, target, weight, avg, override),
                        wrt=wrt,
                        tol=TOL[dtype],
                        what=f"{reduction=} {override=} {avg=} "
                        f"weight={None if weight is None else tuple(weight.shape)}",
                    )


@pytest.mark.parametrize("loss_weight", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dfl_grid_matches_mmdet(dtype, loss_weight):
    m, bins = 41, 17
    pred, target = _dfl_inputs(m, bins, dtype)
    for reduction in REDUCTIONS:
        stock = DistributionFocalLoss(reduction=reduction, loss_weight=loss_weight)
        fused = FusedDistributionFocalLoss(reduction=reduction, loss_weight=loss_weight)
        for override in OVERRIDES:
            for avg in _avg_factors(dtype):
                for weight in _weights(m, dtype):
                    wrt = (pred,) if weight is None or not weight.requires_grad else (pred, weight)
                    _assert_same(
                        stock,
                        fused,
                        (pred, target, weight, avg, override),
                        wrt=wrt,
                        tol=TOL[dtype],
                        what=f"{reduction=} {override=} {avg=}",
                    )


def test_avg_factor_result_shapes_are_mmdet_s():
    """A (1,) tensor avg_factor gives a (1,) loss, as ``loss.sum() / (avg_factor + eps)`` does
    in mmdet (DETR-style heads pass ``max(cls_scores.new_tensor([x]), 1)``)."""
    pred, labels, scores, _ = _qfl_inputs(9, 4, torch.float32, False)
    for avg, shape in [(None, ()), (2.0, ()), (torch.tensor(2.0), ()), (torch.tensor([2.0]), (1,))]:
        for cls in (QualityFocalLoss, FusedQualityFocalLoss):
            assert cls()(pred, (labels, scores), avg_factor=avg).shape == shape


def test_weight_shapes_broadcast_as_in_mmdet():
    n, c = 6, 4
    pred, labels, scores, _ = _qfl_inputs(n, c, torch.float32, False)
    stock, fused = QualityFocalLoss(reduction="none"), FusedQualityFocalLoss(reduction="none")
    for weight in (torch.rand(n, 1), torch.rand(1), torch.tensor(0.5), torch.rand(n, n)):
        _assert_same(
            stock,
            fused,
            (pred, (labels, scores), weight),
            wrt=(pred,),
            tol=TOL[torch.float32],
            what=f"weight {tuple(weight.shape)}",
        )
    assert fused(pred, (labels, scores), torch.rand(n, 1)).shape == (n, n)
    # (N, C) with N != C does not broadcast against the (N,) loss: both raise RuntimeError
    _assert_same(
        stock,
        fused,
        (pred, (labels, scores), torch.rand(n, c)),
        wrt=(pred,),
        tol=TOL[torch.float32],
        what="weight (N, C)",
    )


def test_targets_that_require_grad_get_mmdet_s_gradient():
    """mmdet's formulas are differentiable in the QFL scores / dense target and the DFL target;
    the fused modules must not silently drop those gradients."""
    tol = TOL[torch.float64]
    pred, labels, scores, dense = _qfl_inputs(11, 5, torch.float64, False)
    scores.requires_grad_(True)
    _assert_same(
        QualityFocalLoss(),
        FusedQualityFocalLoss(),
        (pred, (labels, scores)),
        wrt=(pred, scores),
        tol=tol,
        what="qfl scores grad",
    )

    # dense target: mmdet's gradient where the target is non-zero; where it is exactly 0,
    # mmdet's masked write gives 0, we give the formula's derivative (documented difference)
    dense.requires_grad_(True)
    want = torch.autograd.grad(QualityFocalLoss()(pred, dense), (pred, dense))
    got = torch.autograd.grad(FusedQualityFocalLoss()(pred, dense), (pred, dense))
    torch.testing.assert_close(got[0], want[0], **tol)
    nonzero = dense.detach() != 0
    assert 0 < nonzero.sum() < dense.numel()
    torch.testing.assert_close(got[1][nonzero], want[1][nonzero], **tol)
    assert not want[1][~nonzero].any()
    formula = torch.autograd.grad(reference.quality_focal_loss_dense(pred, dense).mean(), dense)[0]
    torch.testing.assert_close(got[1], formula, **tol)

    dpred, dtarget = _dfl_inputs(13, 9, torch.float64)
    dtarget.requires_grad_(True)
    _assert_same(
        DistributionFocalLoss(),
        FusedDistributionFocalLoss(),
        (dpred, dtarget),
        wrt=(dpred, dtarget),
        tol=TOL[torch.float64],
        what="dfl target grad",
    )


def test_dense_target_forms_mmdet_accepts():
    # integer one-hot and float64 targets (mmdet casts them with type_as(pred)), and an
    # (N, C, H, W) target
    pred, labels, _, dense = _qfl_inputs(8, 5, torch.float32, False)
    one_hot = torch.nn.functional.one_hot(labels.clamp(0, 4), 5)
    for target in (one_hot, one_hot.bool(), dense.double()):
        _assert_same(
            QualityFocalLoss(),
            FusedQualityFocalLoss(),
            (pred, target),
            wrt=(pred,),
            tol=TOL[torch.float32],
            what=f"{target.dtype} dense target",
        )
    gen = torch.Generator().manual_seed(3)
    pred4 = (torch.randn(2, 5, 3, 4, generator=gen) * 3).requires_grad_(True)
    target4 = torch.rand(2, 5, 3, 4, generator=gen) * (torch.rand(2, 5, 3, 4, generator=gen) > 0.6)
    for reduction in REDUCTIONS:
        _assert_same(
            QualityFocalLoss(reduction=reduction),
            FusedQualityFocalLoss(reduction=reduction),
            (pred4, target4),
            wrt=(pred4,),
            tol=TOL[torch.float32],
            what=f"(N, C, H, W) {reduction}",
        )


def test_dfl_integer_targets_as_in_mmdet():
    pred, _ = _dfl_inputs(6, 9, torch.float32)
    target = torch.tensor([0, 1, 2, 5, 7, 3])
    _assert_same(
        DistributionFocalLoss(),
        FusedDistributionFocalLoss(),
        (pred, target),
        wrt=(pred,),
        tol=TOL[torch.float32],
        what="integer DFL targets",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_pred_gives_float32_loss(dtype):
    """Deliberate difference: the loss of a 16-bit pred is float32 (mmdet's QFL returns the
    16-bit dtype): mmdet's formula evaluated in float32 on the same (rounded) inputs; gradients
    keep pred's dtype."""
    pred, labels, scores, dense = _qfl_inputs(23, 6, torch.float32, False)
    pred16 = pred.detach().to(dtype).requires_grad_(True)
    weight = torch.rand(23)
    for target in ((labels, scores), dense):
        got = FusedQualityFocalLoss(reduction="none")(pred16, target, weight)
        want = QualityFocalLoss(reduction="none")(pred16.detach().float(), target, weight)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(got.sum(), pred16)
        assert grad.dtype == dtype
    dpred, dtarget = _dfl_inputs(19, 17, torch.float32)
    dpred16 = dpred.detach().to(dtype).requires_grad_(True)
    got = FusedDistributionFocalLoss(reduction="none")(dpred16, dtarget)
    want = DistributionFocalLoss(reduction="none")(dpred16.detach().float(), dtarget)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), dpred16)
    assert grad.dtype == dtype


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_inputs(reduction):
    """N = 0: 'none' / 'sum' / mean with avg_factor are mmdet's; the plain mean is 0 where
    mmdet gives NaN (deliberate, documented), and backward still works."""
    pred, labels, scores, dense = _qfl_inputs(0, 5, torch.float32, False)
    dpred, dtarget = _dfl_inputs(0, 17, torch.float32)
    cases = [
        (QualityFocalLoss, FusedQualityFocalLoss, pred, (labels, scores)),
        (QualityFocalLoss, FusedQualityFocalLoss, pred, dense),
        (DistributionFocalLoss, FusedDistributionFocalLoss, dpred, dtarget),
    ]
    for stock_cls, fused_cls, p, t in cases:
        stock, fused = stock_cls(reduction=reduction), fused_cls(reduction=reduction)
        for avg in (None, 4.0):
            if reduction == "sum" and avg is not None:
                continue
            want, got = stock(p, t, avg_factor=avg), fused(p, t, avg_factor=avg)
            assert got.shape == want.shape and got.dtype == want.dtype
            if reduction == "mean" and avg is None:
                assert torch.isnan(want) and got.item() == 0.0
            else:
                torch.testing.assert_close(got, want)
            (grad,) = torch.autograd.grad(got.sum(), p)
            assert grad.shape == p.shape and not grad.any()


def test_errors_where_mmdet_raises():
    pred, labels, scores, dense = _qfl_inputs(5, 3, torch.float32, False)
    dpred, dtarget = _dfl_inputs(5, 9, torch.float32)
    pairs = [
        (QualityFocalLoss, FusedQualityFocalLoss, (labels, scores)),
        (DistributionFocalLoss, FusedDistributionFocalLoss, dtarget),
    ]
    for stock_cls, fused_cls, target in pairs:
        p = pred if stock_cls is QualityFocalLoss else dpred
        for override in ("avg", "elementwise_mean", True, 0):  # AssertionError
            for cls in (stock_cls, fused_cls):
                with pytest.raises(AssertionError):
                    cls()(p, target, reduction_override=override)
        for cls in (stock_cls, fused_cls):
            with pytest.raises(ValueError, match="avg_factor can not be used"):
                cls()(p, target, avg_factor=2, reduction_override="sum")
            with pytest.raises(ValueError, match="not a valid value for reduction"):
                cls(reduction="avg")(p, target)  # torch's reduction parser, inside mmdet
    # QFL: a target tuple that is not (labels, scores); a dense target of another shape
    for bad in ((labels,), (labels, scores, scores)):
        for cls in (QualityFocalLoss, FusedQualityFocalLoss):
            with pytest.raises(AssertionError):
                cls()(pred, bad)
    for cls in (QualityFocalLoss, FusedQualityFocalLoss):
        with pytest.raises(AssertionError):
            cls()(pred, dense[:, :2])
    # DFL: a target past the last bin indexes a bin that does not exist in mmdet; we refuse it
    beyond = dtarget.clone()
    beyond[0] = 8.5
    with pytest.raises((IndexError, RuntimeError)):
        DistributionFocalLoss()(dpred, beyond)
    with pytest.raises(ValueError, match="target must lie in"):
        FusedDistributionFocalLoss()(dpred, beyond)


def test_dfl_target_at_last_bin_is_exact():
    """Deliberate difference: mmdet indexes the non-existent bin n+1 for a target equal to n
    (an error); the fused loss there is -log softmax(pred)[n] (bins (n-1, n), weights (0, 1))."""
    dpred, _ = _dfl_inputs(3, 9, torch.float32)
    target = torch.full((3,), 8.0)
    with pytest.raises((IndexError, RuntimeError)):
        DistributionFocalLoss(reduction="none")(dpred, target)
    got = FusedDistributionFocalLoss(reduction="none")(dpred, target)
    torch.testing.assert_close(got, -torch.log_softmax(dpred, 1)[:, 8])
    torch.testing.assert_close(got, reference.distribution_focal_loss(dpred, target))


# --------------------------------------------------------------------------------------------
# Integral


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integral_matches_mmdet(dtype):
    gen = torch.Generator().manual_seed(0)
    stock, fused = Integral(16), FusedIntegral(16)
    for shape in [(29, 68), (0, 68), (2, 3, 68), (5, 4, 17)]:  # every shape mmdet reshapes
        x = (torch.randn(*shape, generator=gen, dtype=dtype) * 4).requires_grad_(True)
        _assert_same(stock, fused, (x,), wrt=(x,), tol=TOL[dtype], what=f"{shape}")
    x16 = torch.randn(7, 68, generator=gen).half()
    assert fused(x16).dtype == torch.float16  # the input dtype, as mmdet
    torch.testing.assert_close(fused(x16).float(), stock(x16.float()), rtol=1e-3, atol=2e-3)


def test_integral_checkpoints_and_onnx_path(monkeypatch):
    stock, fused = Integral(16), FusedIntegral(16)
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(fused.state_dict(), strict=True)
    # bin values the kernel cannot honour: an error, and the buffer is left as it was
    bad = {"project": torch.linspace(0, 16, 17) * 2}
    with pytest.raises(RuntimeError, match="project must be linspace"):
        fused.load_state_dict(bad)
    assert torch.equal(fused.project, stock.project)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused.load_state_dict(Integral(7).state_dict())
    half = FusedIntegral(16).half()  # a cast model still loads (and fuses)
    half.load_state_dict(Integral(16).half().state_dict(), strict=True)
    # ONNX export runs mmdet's own Softmax + Linear formula (the fused op has no symbolic)
    x = torch.randn(3, 68)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.equal(fused(x), stock(x))


# --------------------------------------------------------------------------------------------
# fuse


def test_fuse_converts_in_place_and_keeps_everything_else():
    head = _upstream_gfl_head(fused=False)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    loss_cls, loss_dfl, integral = head.loss_cls, head.loss_dfl, head.integral
    calls = []
    loss_cls.register_forward_hook(lambda *_: calls.append(1))
    head.loss_cls.custom_attribute = "kept"

    assert fuse(head) is head
    assert type(head.loss_cls) is FusedQualityFocalLoss
    assert type(head.loss_dfl) is FusedDistributionFocalLoss
    assert type(head.integral) is FusedIntegral
    # the same objects: settings, attributes and hooks are untouched
    assert head.loss_cls is loss_cls and head.loss_dfl is loss_dfl and head.integral is integral
    assert (
        loss_cls.beta,
        loss_cls.loss_weight,
        loss_cls.reduction,
        loss_cls.activated,
        loss_cls.use_sigmoid,
    ) == (2.0, 1.0, "mean", False, True)
    assert loss_dfl.loss_weight == 0.25 and integral.reg_max == 16
    assert loss_cls.custom_attribute == "kept"
    assert type(head.loss_bbox).__name__ == "GIoULoss"
    after = head.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    pred, labels, scores, _ = _qfl_inputs(4, 4, torch.float32, False)
    head.loss_cls(pred, (labels, scores))
    assert calls == [1]

    # idempotent; backend= also reaches modules that are already fused
    assert fuse(head, backend="reference") is head
    assert head.loss_cls.backend == head.loss_dfl.backend == head.integral.backend == "reference"


def test_fuse_shared_modules_subclasses_and_bad_project():
    class MyQFL(QualityFocalLoss):  # a user subclass may override forward: left alone
        pass

    shared = QualityFocalLoss()
    model = torch.nn.ModuleDict(
        dict(a=shared, b=torch.nn.Sequential(shared), c=MyQFL(), d=Integral(4))
    )
    fuse(model)
    assert type(model["a"]) is FusedQualityFocalLoss and model["b"][0] is model["a"]
    assert type(model["c"]) is MyQFL and type(model["d"]) is FusedIntegral

    weird = torch.nn.ModuleDict(dict(q=QualityFocalLoss(), i=Integral(4)))
    weird["i"].project.mul_(2)
    with pytest.raises(ValueError, match="project must be linspace"):
        fuse(weird)
    assert type(weird["q"]) is QualityFocalLoss  # nothing converted
    with pytest.raises(TypeError):
        fuse(QualityFocalLoss)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# GFLHead of configs/gfl/gfl_r50_fpn_1x_coco.py: stock vs fused

# mmdet configs/gfl/gfl_r50_fpn_1x_coco.py, model.bbox_head and model.train_cfg
GFL_R50_HEAD = dict(
    type="GFLHead",
    num_classes=80,
    in_channels=256,
    stacked_convs=4,
    feat_channels=256,
    anchor_generator=dict(
        type="AnchorGenerator",
        ratios=[1.0],
        octave_base_scale=8,
        scales_per_octave=1,
        strides=[8, 16, 32, 64, 128],
    ),
    loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
    loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
    reg_max=16,
    loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
)
GFL_R50_TRAIN_CFG = dict(
    assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False
)
# Only the tower width shrinks (CPU time); everything the losses see (80 classes, reg_max 16,
# strides, anchors, ATSS, loss types and weights) is the config's.
CHANNELS = 64
IMG = 384


def _head_cfg(**loss_types: str) -> dict:
    cfg = copy.deepcopy(GFL_R50_HEAD)
    cfg.update(in_channels=CHANNELS, feat_channels=CHANNELS, train_cfg=GFL_R50_TRAIN_CFG)
    for key, type_name in loss_types.items():
        cfg[key]["type"] = type_name
    return cfg


def _spread_outputs(head: GFLHead) -> None:
    """Realistic, not random-init, outputs: mmdet's init gives near-constant logits (cls about
    -4.6, uniform side distributions), which would hide layout bugs (bins vs sides, classes vs
    anchors); these final layers give logits with a spread of about 1.4."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.gfl_cls.weight.normal_(0, 0.05, generator=gen)
        head.gfl_cls.bias.normal_(-2.5, 1.0, generator=gen)
        head.gfl_reg.weight.normal_(0, 0.05, generator=gen)
        head.gfl_reg.bias.normal_(0, 1.0, generator=gen)


def _batch(batch: int = 2, boxes: int = 8, seed: int = 2):
    """FPN-like features, ground truth of many sizes (positives on several levels), metas."""
    gen = torch.Generator().manual_seed(seed)
    feats = tuple(
        torch.randn(batch, CHANNELS, IMG // s, IMG // s, generator=gen)
        for s in GFL_R50_HEAD["anchor_generator"]["strides"]
    )
    gts = []
    for _ in range(batch):
        wh = (torch.exp(torch.rand(boxes, 2, generator=gen) * 3.3) * IMG / 24).clamp(max=IMG - 8)
        xy = torch.rand(boxes, 2, generator=gen) * (IMG - wh)
        gts.append(
            InstanceData(
                bboxes=torch.cat([xy, xy + wh], 1),
                labels=torch.randint(0, 80, (boxes,), generator=gen),
            )
        )
    metas = [dict(img_shape=(IMG, IMG), pad_shape=(IMG, IMG), scale_factor=(1.0, 1.0))] * batch
    return feats, gts, metas


def _head_losses(head: GFLHead, batch) -> dict[str, list[torch.Tensor]]:
    feats, gts, metas = batch
    return head.loss_by_feat(*head(feats), gts, metas)


@pytest.fixture(scope="module")
def mmdet_gfl_heads() -> tuple[GFLHead, GFLHead]:
    """(stock GFLHead, deepcopy of it converted by ``fuse``), one init."""
    torch.manual_seed(0)
    stock = MODELS.build(_head_cfg())
    _spread_outputs(stock)
    return stock, fuse(copy.deepcopy(stock))


def test_gfl_head_losses_gradients_and_sgd_match_mmdet(mmdet_gfl_heads):
    stock, fused = (copy.deepcopy(h) for h in mmdet_gfl_heads)
    assert type(fused.loss_cls) is FusedQualityFocalLoss and type(fused.integral) is FusedIntegral
    batch = _batch()

    # the comparison means something: many positives, on several FPN levels
    want = _head_losses(stock, batch)
    assert sum(float(w > 0) for w in want["loss_dfl"]) >= 3
    anchors, valid = stock.get_anchors([f.shape[-2:] for f in batch[0]], batch[2], device="cpu")
    labels = torch.cat(
        [t.flatten() for t in stock.get_targets(anchors, valid, batch[1], batch[2])[1]]
    )
    assert ((labels >= 0) & (labels < 80)).sum() >= 100

    got = _head_losses(fused, batch)
    assert_losses_equal(got, want)
    total(want).backward()
    total(got).backward()
    for (name, p_s), p_f in zip(stock.named_parameters(), fused.parameters()):
        assert p_s.grad is not None and p_f.grad is not None, name
        assert rel_l2(p_f.grad, p_s.grad) <= 1e-4, name

    # three SGD steps from the same init
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (stock, fused)]
    for _ in range(3):
        for model, opt in zip((stock, fused), opts):
            opt.zero_grad()
            total(_head_losses(model, batch)).backward()
            opt.step()
    for (name, p_s), p_f in zip(stock.named_parameters(), fused.parameters()):
        assert rel_l2(p_f.detach(), p_s.detach()) <= 1e-4, name
    assert_losses_equal(_head_losses(fused, batch), _head_losses(stock, batch))


def test_gfl_head_state_dicts_and_strict_loading(mmdet_gfl_heads):
    stock, fused = mmdet_gfl_heads
    sd_s, sd_f = stock.state_dict(), fused.state_dict()
    assert list(sd_s) == list(sd_f) and "integral.project" in sd_f
    assert all(torch.equal(sd_s[k], sd_f[k]) for k in sd_s)
    fresh_fused = fuse(MODELS.build(_head_cfg()))
    assert fresh_fused.load_state_dict(sd_s, strict=True).missing_keys == []
    fresh_stock = MODELS.build(_head_cfg())
    fresh_stock.load_state_dict(fresh_fused.state_dict(), strict=True)
    assert all(torch.equal(v, sd_s[k]) for k, v in fresh_stock.state_dict().items())


def test_gfl_head_built_from_fused_config_types(mmdet_gfl_heads):
    """The config route: loss_cls / loss_dfl with type='Fused...' in a head built by MODELS."""
    stock = mmdet_gfl_heads[0]
    cfg = _head_cfg(loss_cls="FusedQualityFocalLoss", loss_dfl="FusedDistributionFocalLoss")
    head = MODELS.build(cfg)
    assert type(head.loss_cls) is FusedQualityFocalLoss
    assert (head.loss_cls.beta, head.loss_cls.loss_weight) == (2.0, 1.0)
    assert type(head.loss_dfl) is FusedDistributionFocalLoss and head.loss_dfl.loss_weight == 0.25
    assert type(head.integral) is Integral  # mmdet builds it directly: fuse() converts it
    head.load_state_dict(stock.state_dict(), strict=True)
    batch = _batch(seed=5)
    assert_losses_equal(_head_losses(head, batch), _head_losses(stock, batch))


# --------------------------------------------------------------------------------------------
# a whole GFL detector


def _gfl_detector() -> torch.nn.Module:
    head = _head_cfg()
    head.pop("train_cfg")
    # the data preprocessor is looked up in the default scope; no global scope is set here
    with DefaultScope.overwrite_default_scope("mmdet"):
        return _build_detector(head)


def _build_detector(head: dict) -> torch.nn.Module:
    return MODELS.build(_detector_cfg(head))


def _detector_cfg(head: dict) -> dict:
    """mmdet's GFL detector config with a ResNet-18 backbone and ``head``."""
    return dict(
        type="GFL",
        data_preprocessor=dict(
            type="DetDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_size_divisor=32,
        ),
        backbone=dict(
            type="ResNet",
            depth=18,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=-1,
            norm_cfg=dict(type="BN", requires_grad=True),
            norm_eval=True,
            style="pytorch",
        ),
        neck=dict(
            type="FPN",
            in_channels=[64, 128, 256, 512],
            out_channels=CHANNELS,
            start_level=1,
            add_extra_convs="on_output",
            num_outs=5,
        ),
        bbox_head=head,
        train_cfg=GFL_R50_TRAIN_CFG,
        test_cfg=ConfigDict(
            nms_pre=1000,
            min_bbox_size=0,
            score_thr=0.05,
            nms=dict(type="nms", iou_threshold=0.6),
            max_per_img=100,
        ),
    )


def _detector_inputs(size: int, seed: int) -> tuple[torch.Tensor, list]:
    """A batch of 2 images of ``size`` pixels and their data samples (ground truth, metas)."""
    _, gts, _ = _batch(batch=2, boxes=6, seed=seed)
    gen = torch.Generator().manual_seed(4)
    return torch.randn(2, 3, size, size, generator=gen), data_samples(gts, size)


def test_whole_detector_fuse_loss_and_predict():
    torch.manual_seed(0)
    stock = _gfl_detector()
    _spread_outputs(stock.bbox_head)
    fused = fuse(copy.deepcopy(stock))
    converted = {
        n: type(m)
        for n, m in fused.named_modules()
        if isinstance(m, (FusedQualityFocalLoss, FusedDistributionFocalLoss, FusedIntegral))
    }
    assert converted == {
        "bbox_head.loss_cls": FusedQualityFocalLoss,
        "bbox_head.loss_dfl": FusedDistributionFocalLoss,
        "bbox_head.integral": FusedIntegral,
    }
    sd_s, sd_f = stock.state_dict(), fused.state_dict()
    assert list(sd_s) == list(sd_f) and all(torch.equal(sd_s[k], sd_f[k]) for k in sd_s)

    inputs, samples = _detector_inputs(size=256, seed=9)
    stock.train()
    fused.train()
    want, got = stock.loss(inputs, samples), fused.loss(inputs, samples)
    assert_losses_equal(got, want)

    assert_predictions_equal(fused, stock, inputs, samples, rtol=1e-5, atol=1e-4)


def test_whole_detector_under_autocast():
    """Mixed precision (bf16 autocast, what AMP runs on a CPU) through the fused QFL, DFL and
    16-bit integral: finite losses close to stock's, finite gradients, and a step that differs
    from stock's far less than mixed precision itself makes it differ from the float32 step."""
    torch.manual_seed(0)
    stock = _gfl_detector().train()
    _spread_outputs(stock.bbox_head)
    fused = fuse(copy.deepcopy(stock))
    inputs, samples = _detector_inputs(size=256, seed=9)
    losses, fused_vs_stock, amp_vs_float32 = autocast_steps(stock, fused, inputs, samples)
    for key in losses["stock"]:
        for g, w in zip(losses["fused"][key], losses["stock"][key]):
            assert torch.isfinite(g), key
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-2, atol=1e-4)
    assert fused_vs_stock < 0.5 * amp_vs_float32, (fused_vs_stock, amp_vs_float32)


def test_fuse_hook_fuses_a_config_built_run(tmp_path) -> None:
    """``custom_hooks=[dict(type='FuseGFLOpsHook')]`` in a config: a real mmengine Runner trains
    mmdet's GFL detector with the fused losses *and* the fused Integral (which no config key
    reaches), fuses the EMA copy too (EMAHook listed first: the priority orders them), and
    writes checkpoints that load into a stock detector with ``strict=True``."""
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader

    size = 128
    _, gts, _ = _batch(batch=4, boxes=6, seed=5)
    gen = torch.Generator().manual_seed(6)
    data = []
    for gt in gts:
        sample = DetDataSample()
        scale = size / IMG
        sample.gt_instances = InstanceData(
            bboxes=(gt.bboxes * scale).clamp(0, size - 1), labels=gt.labels
        )
        sample.set_metainfo(
            dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
        )
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        data.append(dict(inputs=image, data_samples=sample))
    head = _head_cfg()
    head.pop("train_cfg")
    runner = Runner(
        model=_detector_cfg(head),
        work_dir=str(tmp_path),
        train_dataloader=DataLoader(data, batch_size=2, collate_fn=pseudo_collate),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=1e-3, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=2),
        custom_hooks=[dict(type="EMAHook"), dict(type="FuseGFLOpsHook")],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False)),
        default_scope="mmdet",
        env_cfg=dict(mp_cfg=this_process_mp_cfg()),
        log_level="WARNING",
    )
    calls = []
    integral = runner.model.bbox_head.integral
    integral.register_forward_hook(lambda *_: calls.append(type(integral)))
    with torch_threads_kept():
        runner.train()
    assert calls and set(calls) == {FusedIntegral}  # every training step ran the fused Integral
    (ema,) = [h for h in runner.hooks if type(h).__name__ == "EMAHook"]
    for model in (runner.model, ema.ema_model.module):
        kinds = {type(m) for m in model.modules()}
        assert {FusedQualityFocalLoss, FusedDistributionFocalLoss, FusedIntegral} <= kinds
        assert not kinds & {QualityFocalLoss, DistributionFocalLoss, Integral}
    ckpt = torch.load(tmp_path / "iter_2.pth", map_location="cpu", weights_only=False)
    with DefaultScope.overwrite_default_scope("mmdet"):
        stock = _build_detector(copy.deepcopy(head))
    stock.load_state_dict(ckpt["state_dict"], strict=True)
    assert type(stock.bbox_head.integral) is Integral


def test_mmdet_gfl_config_file_trains_fused(tmp_path) -> None:
    """mmdet's own ``configs/gfl/gfl_r50_fpn_1x_coco.py`` (the file shipped in the mmdet
    package), with the lines a user adds -- the import, the two loss types, the hook -- runs in
    mmengine's Runner as mmdet's ``tools/train.py`` runs it: the real COCO dataset class,
    pipeline and evaluator on a tiny COCO-format dataset written here; every training step
    runs the fused Integral, and the model holds no stock GFL module.  (Shrunk for a CPU test:
    ResNet-18 without pretrained weights, 96-pixel images, one epoch of two iterations.)"""
    from pathlib import Path

    from mmengine.config import Config

    cfg = Config.fromfile(Path(mmdet.__file__).parent / ".mim/configs/gfl/gfl_r50_fpn_1x_coco.py")
    # what a user adds
    cfg.custom_imports = dict(imports=["gfl_ops.integrations.mmdet"], allow_failed_imports=False)
    cfg.model.bbox_head.loss_cls.type = "FusedQualityFocalLoss"
    cfg.model.bbox_head.loss_dfl.type = "FusedDistributionFocalLoss"
    cfg.custom_hooks = [dict(type="FuseGFLOpsHook")]
    # what makes it a CPU test

    def shrink(pipeline: list) -> None:
        for step in pipeline:
            if step.type == "Resize":
                step.scale = (96, 96)

    tiny_coco_run(cfg, tmp_path, shrink)
    cfg.model.backbone.update(depth=18, init_cfg=None)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=True, min_size=8)
    cfg.model.test_cfg.score_thr = 0.0  # two steps from init score ~0.01: keep some detections
    runner, calls, metrics = train_and_test(cfg, lambda model: model.bbox_head.integral)
    assert len(calls) >= 2 and set(calls) == {FusedIntegral}
    kinds = {type(m) for m in runner.model.modules()}
    assert {FusedQualityFocalLoss, FusedDistributionFocalLoss, FusedIntegral} <= kinds
    assert not kinds & {QualityFocalLoss, DistributionFocalLoss, Integral}
    assert "coco/bbox_mAP" in metrics  # pycocotools evaluated the fused model's detections
