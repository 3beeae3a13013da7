"""The providers each case is timed with: the peers, and gfl_ops per backend.

Every provider of an op is a callable taking the op's positional arguments (see
``cases.make_inputs``) and returning what the detector consumes: the reduced loss (a 0-d tensor)
for QFL and DFL, the (M,) decoded distances for the integral.

Peers:

* ``eager``: the mmdetection-style formulas of :mod:`gfl_ops.reference` (mmdetection's
  ``gfocal_loss.py`` op for op: several eager passes over the N x C matrix, a ``nonzero`` host
  sync, an ``index_put`` write) followed by mmdetection's ``weight_reduce_loss``.  They run in the
  dtype of ``pred``, as mmdetection does when it is handed bf16 logits.
* ``compile``: ``torch.compile`` of exactly the ``eager`` functions (default mode, Inductor).
* ``mmdet`` (when mmdetection imports here): mmdetection's own ``QualityFocalLoss``,
  ``DistributionFocalLoss`` (``mmdet.models.losses``) and GFL ``Integral`` modules, called as
  ``GFLHead`` calls them.  mmdetection needs mmcv's compiled ops to import its model package;
  with mmcv-lite (no compiled ops) the test suite's stand-in for them is installed first
  (:func:`ensure_mmcv_ops`; these modules call none).  Where mmdetection is absent the peer is
  left out and :func:`peer_status` says why.
* ``ultralytics`` (DFL and the integral; when Ultralytics is installed): Ultralytics' own
  ``DFLoss`` (``ultralytics.utils.loss``: its target clamp to ``reg_max - 1 - 0.01`` and its mean
  over a box's four sides, weighted per box as ``BboxLoss`` does) and its ``DFL`` integral module
  (``ultralytics.nn.modules.block``: softmax over the bins in its (b, 4*(n+1), anchors) layout
  and a frozen 1x1 convolution whose weights are 0..n).

Ours: ``gfl_ops-<backend>`` for each backend in ``gfl_ops.available_backends(device_type)``
except ``reference`` (that is the eager peer, already measured).  New backends are picked up as
soon as they register.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import gfl_ops
from benchmarks.cases import QFL_BETA, Inputs
from gfl_ops import reference

_FLOAT32_EPS = torch.finfo(torch.float32).eps

PEERS = ("eager", "compile", "mmdet", "ultralytics")


@dataclass
class Provider:
    """A way to compute an op.

    Attributes:
        name: column label, e.g. 'eager', 'compile', 'gfl_ops-cpu'.
        fn: the callable timed; takes ``Inputs.args`` (after ``prepare``).
        prepare: optional untimed conversion of an input set to the provider's own layout
            (Ultralytics' integral works on (b, 4*(n+1), anchors)).
        compiled: True for the torch.compile peer (its first call compiles; that time is
            reported separately and never part of a timing).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    prepare: Callable[[Inputs], Inputs] | None = None
    compiled: bool = False


# --------------------------------------------------------------------------------------------
# mmdetection-style eager formulas (+ mmdetection's weight_reduce_loss with avg_factor)


def mmdet_weight_reduce(
    loss: torch.Tensor, weight: torch.Tensor, avg_factor: float
) -> torch.Tensor:
    """mmdetection's ``weight_reduce_loss(loss, weight, reduction='mean', avg_factor)``."""
    return (loss * weight).sum() / (avg_factor + _FLOAT32_EPS)


def qfl_eager(
    pred: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: float,
) -> torch.Tensor:
    """QFL as ``GFLHead`` calls it: per-anchor loss summed over classes, mean with avg_factor."""
    return mmdet_weight_reduce(
        reference.quality_focal_loss(pred, labels, scores, QFL_BETA), weight, avg_factor
    )


def dfl_eager(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, avg_factor: float
) -> torch.Tensor:
    """DFL as ``GFLHead`` calls it: per-row loss, weighted, mean with ``avg_factor=4.0``."""
    return mmdet_weight_reduce(reference.distribution_focal_loss(pred, target), weight, avg_factor)


def integral_eager(pred: torch.Tensor) -> torch.Tensor:
    """mmdetection's ``Integral``: softmax over the bins, then a projection on 0..n."""
    return reference.integral(pred)


EAGER = {"qfl": qfl_eager, "dfl": dfl_eager, "integral": integral_eager}


# --------------------------------------------------------------------------------------------
# The frameworks' own modules, imported when installed


def _import_ultralytics():
    from ultralytics.nn.modules.block import DFL
    from ultralytics.utils.loss import DFLoss

    return DFL, DFLoss


def ensure_mmcv_ops() -> str:
    """Make mmdetection's model package importable where mmcv has no compiled ops.

    mmdetection imports mmcv's compiled ops (``mmcv._ext``) with its heads; mmcv-lite (what the
    project's CI installs) has none.  Then the test suite's stand-in for ``mmcv._ext``
    (tests/integrations/mmcv_ext_stub.py: every op raises if called) is installed: the GFL losses
    and head call no compiled op.  Returns a note for the report ('' with a full mmcv)."""
    import importlib
    import importlib.util
    from pathlib import Path

    try:
        importlib.import_module("mmcv._ext")
        return ""
    except ImportError:
        path = Path(__file__).resolve().parent.parent / "tests/integrations/mmcv_ext_stub.py"
        spec = importlib.util.spec_from_file_location("_gfl_mmcv_ext_stub", path)
        stub = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(stub)
        stub.install()
        return "mmcv-lite: test-only stand-in for mmcv._ext (no compiled op in these modules)"


def _import_mmdet():
    import mmcv  # noqa: F401 - absent: the peer is reported as not importable

    ensure_mmcv_ops()
    from mmdet.models.dense_heads.gfl_head import Integral
    from mmdet.models.losses import DistributionFocalLoss, QualityFocalLoss

    return QualityFocalLoss, DistributionFocalLoss, Integral


def _try(importer) -> tuple[object | None, str]:
    try:
        return importer(), "available"
    except Exception as exc:  # ImportError, or mmdet's own checks of the mmcv it finds
        return None, f"not importable here ({type(exc).__name__}: {exc})"


def peer_status() -> dict[str, str]:
    """Framework peer -> 'available' or why it is left out of the run."""
    return {"mmdet": _try(_import_mmdet)[1], "ultralytics": _try(_import_ultralytics)[1]}


def _mmdet_providers(op: str, bins: int, device: torch.device) -> list[Provider]:
    modules, _ = _try(_import_mmdet)
    if modules is None:
        return []
    qfl_cls, dfl_cls, integral_cls = modules
    if op == "qfl":
        qfl = qfl_cls(use_sigmoid=True, beta=QFL_BETA, loss_weight=1.0)

        def fn(pred, labels, scores, weight, avg_factor):
            return qfl(pred, (labels, scores), weight=weight, avg_factor=avg_factor)
    elif op == "dfl":
        dfl = dfl_cls(loss_weight=1.0)

        def fn(pred, target, weight, avg_factor):
            return dfl(pred, target, weight=weight, avg_factor=avg_factor)
    else:
        integral = integral_cls(bins - 1).to(device)

        def fn(pred):  # GFLHead's call: (K, 4*(n+1)) -> (K, 4); here (M, n+1) rows
            return integral(pred.reshape(-1, 4 * bins)).reshape(-1)

        return [Provider("mmdet", fn, prepare=_rows_of_four)]
    return [Provider("mmdet", fn)]


def _rows_of_four(inputs: Inputs) -> Inputs:
    m = inputs.pred.size(0)
    if m % 4:
        raise ValueError(f"the frameworks' layouts need M divisible by 4 (box sides), got {m}")
    return inputs


def _ultralytics_dfl_provider() -> list[Provider]:
    modules, _ = _try(_import_ultralytics)
    if modules is None:
        return []
    _, dfloss_cls = modules

    def fn(pred, target, weight, avg_factor):
        # BboxLoss's call: (4K, bins) logits, (K, 4) targets -> (K, 1) mean over the sides,
        # weighted per box.  DFLoss clamps its target in place: a copy keeps the rotated input
        # buffers unchanged between repetitions (an (M,) pass, as the caller's own indexing is).
        # The case's weights are per box (shared by the 4 side rows, as GFLHead's are); x 4
        # turns DFLoss's mean over the sides into GFLHead's sum, so every provider reports the
        # same number (checked against the float64 reference).
        loss = dfloss_cls(pred.size(1))(pred, target.reshape(-1, 4).clone())
        box_weight = weight.reshape(-1, 4)[:, :1]
        return (loss * box_weight).sum() * 4.0 / (avg_factor + _FLOAT32_EPS)

    return [Provider("ultralytics", fn, prepare=_rows_of_four)]


def _ultralytics_integral_provider(
    bins: int, dtype: torch.dtype, device: torch.device
) -> list[Provider]:
    modules, _ = _try(_import_ultralytics)
    if modules is None:
        return []
    module = modules[0](bins).to(device=device, dtype=dtype)

    def prepare(inputs: Inputs) -> Inputs:
        # The same logits, laid out as Ultralytics' head emits them: (1, 4*(n+1), M/4).
        pred = inputs.pred.detach()
        m = pred.size(0)
        _rows_of_four(inputs)
        x = pred.reshape(m // 4, 4, bins).permute(1, 2, 0).reshape(1, 4 * bins, m // 4)
        x = x.contiguous().requires_grad_(inputs.pred.requires_grad)
        grad_out = None if inputs.grad_out is None else inputs.grad_out.reshape(1, 4, m // 4)
        return Inputs((x,), x, grad_out=grad_out)

    return [Provider("ultralytics", module, prepare=prepare)]


# --------------------------------------------------------------------------------------------
# gfl_ops


def _ours(op: str, backend: str) -> Callable[..., torch.Tensor]:
    if op == "qfl":

        def qfl(pred, labels, scores, weight, avg_factor):
            return gfl_ops.quality_focal_loss(
                pred,
                (labels, scores),
                weight=weight,
                reduction="mean",
                avg_factor=avg_factor,
                beta=QFL_BETA,
                backend=backend,
            )

        return qfl
    if op == "dfl":

        def dfl(pred, target, weight, avg_factor):
            return gfl_ops.distribution_focal_loss(
                pred,
                target,
                weight=weight,
                reduction="mean",
                avg_factor=avg_factor,
                backend=backend,
            )

        return dfl

    def integral(pred):
        return gfl_ops.integral(pred, backend=backend)

    return integral


def ours_backends(device_type: str, include_triton_on_cpu: bool = False) -> list[str]:
    """gfl_ops backends to time on ``device_type``: the available ones except 'reference'.

    On CPU, Triton runs only in its interpreter (TRITON_INTERPRET=1), whose timings mean
    nothing, so it is left out unless asked for.
    """
    names = [b for b in gfl_ops.available_backends(device_type) if b != "reference"]
    if device_type == "cpu" and not include_triton_on_cpu:
        names = [b for b in names if b != "triton"]
    return names


def build_providers(
    op: str,
    dtype: torch.dtype,
    device: torch.device,
    bins: int,
    compiled: dict[str, Callable[..., torch.Tensor]],
    wanted: set[str] | None = None,
) -> list[Provider]:
    """The providers of ``op`` for one case, in the order they are reported.

    Args:
        op: 'qfl' | 'dfl' | 'integral'.
        dtype, device: of the case (Ultralytics' conv weights take them).
        bins: n+1 (used by Ultralytics' integral module).
        compiled: one ``torch.compile`` wrapper per op, shared across cases so its guards and
            recompiles behave as in a training loop.
        wanted: provider names to keep (None: all).
    """
    providers = [Provider("eager", EAGER[op]), Provider("compile", compiled[op], compiled=True)]
    providers += _mmdet_providers(op, bins, device)
    if op == "dfl":
        providers += _ultralytics_dfl_provider()
    elif op == "integral":
        providers += _ultralytics_integral_provider(bins, dtype, device)
    include_triton = wanted is not None and "gfl_ops-triton" in wanted
    for backend in ours_backends(device.type, include_triton):
        providers.append(Provider(f"gfl_ops-{backend}", _ours(op, backend)))
    if wanted is not None:
        providers = [p for p in providers if p.name in wanted]
    return providers


def make_compiled(dynamic: bool | None) -> dict[str, Callable[..., torch.Tensor]]:
    """``torch.compile`` of each eager peer (Inductor, default mode).

    ``dynamic=None`` is torch's default: the first shape is specialised, a recompile for a new
    shape generalises to dynamic shapes.  ``False`` specialises every shape (the strongest
    compile peer, one compilation per size).
    """
    _raise_recompile_limits()
    return {op: torch.compile(fn, dynamic=dynamic) for op, fn in EAGER.items()}


def _raise_recompile_limits() -> None:
    # One compiled function sees every size x dtype x requires_grad of a run; past the default
    # limit (8) Dynamo would silently fall back to eager and the 'compile' column would lie.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4096)
