"""gfl_ops.integrations.ultralytics against the real ultralytics package (no re-implementation).

* ``patch`` on YOLOv8n and YOLO11n built from their yaml (no weights are downloaded), stock vs
  patched copies of one initialisation: state dict, eval-mode head outputs, loss parts, parameter
  gradients, three SGD steps; the head made *realistic* first (peaked, varied bin distributions:
  a head at random init emits near-uniform ones, which hide layout bugs) and batches with several
  boxes per image, so that there are many positives;
* the fused modules on their own: the head DFL's channel layout, its fallback for weights that are
  not ``arange``, ``torch.compile``; the DFL loss's clamp, shapes and dtypes, also under autocast;
* an unpatched model in the same process keeps Ultralytics' own classes and code;
* ``YOLO.predict`` / ``val`` / ``train`` / ``save`` / ``export(format="onnx")`` on a patched
  model: training on a tiny dataset written here runs the fused ops (counted), leaves the trained
  model patched and writes stock checkpoints; the ONNX files (Ultralytics' exporter and torch's
  dynamo exporter) hold standard-domain ops only and match the patched PyTorch model in
  onnxruntime.

ultralytics is imported at module level on purpose: without it this file fails instead of
skipping.  Ultralytics reads its settings directory and the network status when imported, and
changes process-wide state when it trains or picks a device; this module gives it a private
settings directory, no network, and undoes the process-wide changes after each test.
"""

from __future__ import annotations

import atexit
import copy
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# Before ultralytics is imported: it writes settings.json into YOLO_CONFIG_DIR, checks whether it
# is online (DNS look-ups) unless YOLO_OFFLINE is set, and sets OMP_NUM_THREADS=1 if unset.
_CONFIG_DIR = tempfile.mkdtemp(prefix="gfl_ops_ultralytics_")
# removed at exit, not after this module: ultralytics keeps the path for the whole process
atexit.register(shutil.rmtree, _CONFIG_DIR, True)
os.environ["YOLO_CONFIG_DIR"] = _CONFIG_DIR
os.environ["YOLO_OFFLINE"] = "1"
_OMP_BEFORE = os.environ.get("OMP_NUM_THREADS")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import ultralytics  # noqa: E402
from PIL import Image  # noqa: E402
from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.engine.trainer import BaseTrainer  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.modules.block import DFL  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, SegmentationModel, torch_safe_load  # noqa: E402
from ultralytics.utils.loss import (  # noqa: E402
    DFLoss,
    v8DetectionLoss,
    v8SegmentationLoss,
)

import gfl_ops  # noqa: E402
from gfl_ops import functional  # noqa: E402
from gfl_ops.integrations.ultralytics import (  # noqa: E402
    FusedDetectionModel,
    FusedDetectionTrainer,
    FusedDFL,
    FusedDFLoss,
    FusedV8DetectionLoss,
    FusedYOLO,
    is_patched,
    patch,
    patch_trainer,
    unpatch,
)
from gfl_ops.integrations.ultralytics._classes import WORKERS_ENV  # noqa: E402
from gfl_ops.integrations.ultralytics._tuning import FUSED_LAUNCH, fused_command  # noqa: E402

if _OMP_BEFORE is None:  # ultralytics' default is for its own training runs, not this process
    os.environ.pop("OMP_NUM_THREADS", None)
# Importing ultralytics replaces PIL.Image.open for the whole process with a wrapper that, on an
# undecodable file, tries to pip-install a HEIF plugin and raises ModuleNotFoundError offline.
# pytest imports every test module before running any, so without this the detector's tests of
# undecodable images (tests/detector/test_cli.py) would meet Ultralytics' wrapper.
# (Releases before ~8.4.1xx have no such wrapper: scripts/check_ultralytics_versions.sh runs this
# file against them too.)
Image.open = getattr(ultralytics.utils.patches, "_image_open", Image.open)
assert ultralytics.__version__.startswith("8."), ultralytics.__version__

CFGS = ["yolov8n.yaml", "yolo11n.yaml"]
# YOLOv10: an end-to-end head, one-to-many and one-to-one branches sharing the DFL; E2ELoss
E2E_CFG = "yolov10n.yaml"
DFL_KEY = {
    "yolov8n.yaml": "model.22.dfl.conv.weight",
    "yolo11n.yaml": "model.23.dfl.conv.weight",
    E2E_CFG: "model.23.dfl.conv.weight",
}
IMGSZ = 128
BINS = 16  # Ultralytics' reg_max


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(autouse=True)
def _process_state() -> Iterator[None]:
    """One intra-op thread (the suite's policy on its few shared cores), and everything
    Ultralytics changes process-wide restored afterwards: it sets torch's thread count when it
    selects a CPU device, deterministic algorithms and seeds when it trains, environment
    variables, and torch's weights_only allow-list when it loads a checkpoint safely."""
    env = dict(os.environ)
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # torch.utils.deterministic (2.2) and the weights_only allow-list (2.5) are absent before
    deterministic_utils = getattr(torch.utils, "deterministic", None)
    fill = deterministic_utils.fill_uninitialized_memory if deterministic_utils else None
    cudnn = torch.backends.cudnn.deterministic
    rng = torch.get_rng_state(), np.random.get_state()
    get_safe_globals = getattr(torch.serialization, "get_safe_globals", None)
    safe_globals = get_safe_globals() if get_safe_globals else None  # Ultralytics' load adds
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if deterministic_utils is not None:
            deterministic_utils.fill_uninitialized_memory = fill
        torch.backends.cudnn.deterministic = cudnn
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        os.environ.clear()
        os.environ.update(env)
        if get_safe_globals is not None and get_safe_globals() != safe_globals:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(safe_globals)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network even if ultralytics was imported before this module set YOLO_OFFLINE (its two
    readers of the online flag: the pip update check of ``YOLO.train`` and error reporting)."""
    monkeypatch.setattr(ultralytics.utils, "ONLINE", False)
    monkeypatch.setattr(ultralytics.utils.checks, "ONLINE", False)


@dataclass
class Calls:
    """Calls of gfl_ops' functional entry points (the fused ops) while the fixture is active."""

    integral: int = 0
    dfl: int = 0
    dfl_rows: list[int] = field(default_factory=list)

    def snapshot(self) -> tuple[int, int]:
        return self.integral, self.dfl


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Count the fused ops: wraps ``gfl_ops.integral`` / ``distribution_focal_loss`` (both the
    package and ``gfl_ops.functional`` bindings) with counting pass-throughs."""
    rec = Calls()
    integral, dfl = functional.integral, functional.distribution_focal_loss

    def counting_integral(pred, *args, **kwargs):
        rec.integral += 1
        return integral(pred, *args, **kwargs)

    def counting_dfl(pred, *args, **kwargs):
        rec.dfl += 1
        rec.dfl_rows.append(pred.shape[0])
        return dfl(pred, *args, **kwargs)

    for module in (functional, gfl_ops):
        monkeypatch.setattr(module, "integral", counting_integral)
        monkeypatch.setattr(module, "distribution_focal_loss", counting_dfl)
    return rec


def realistic_head(model: DetectionModel, seed: int = 0) -> DetectionModel:
    """Make the Detect head's outputs look trained: its final box convs (``cv2[i][-1]``) scaled up
    with varied biases, so each side's distribution over the bins is peaked at varied bins; class
    biases spread so that predictions pass the confidence threshold."""
    g = torch.Generator().manual_seed(1000 + seed)
    head = model.model[-1]
    with torch.no_grad():
        for box, cls in zip(head.cv2, head.cv3):
            box[-1].weight.mul_(10)
            box[-1].bias.copy_(2 * torch.randn(box[-1].bias.shape, generator=g))
            cls[-1].bias.copy_(1.5 * torch.randn(cls[-1].bias.shape, generator=g) - 1)
    return model


def build_stock(cfg: str, seed: int = 0) -> DetectionModel:
    """A stock DetectionModel from ultralytics' yaml (no download), realistic head, with the
    default training hyperparameters that ``v8DetectionLoss`` reads (``model.args``)."""
    torch.manual_seed(seed)
    model = DetectionModel(cfg, verbose=False)
    model.args = get_cfg()
    return realistic_head(model, seed)


def stock_and_fused(cfg: str, seed: int = 0) -> tuple[DetectionModel, DetectionModel]:
    stock = build_stock(cfg, seed)
    return stock, patch(copy.deepcopy(stock))


def make_batch(seed: int = 0, n_img: int = 2, boxes_per_img: int = 6) -> dict[str, torch.Tensor]:
    """A training batch as Ultralytics' dataloader gives it: images (B, 3, H, W) in [0, 1];
    normalised xywh boxes (N, 4), classes (N, 1), image index (N,).  Box sizes from 10% to 98%
    of the image: distances from 0 to past the last bin (the clamp) at stride 8."""
    g = torch.Generator().manual_seed(seed)
    n = n_img * boxes_per_img
    wh = 0.1 + 0.8 * torch.rand(n, 2, generator=g)
    wh[0] = 0.98  # one box nearly the whole image
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return {
        "img": torch.rand(n_img, 3, IMGSZ, IMGSZ, generator=g),
        "batch_idx": torch.arange(n_img).repeat_interleave(boxes_per_img).float(),
        "cls": torch.randint(0, 80, (n, 1), generator=g).float(),
        "bboxes": torch.cat([xy, wh], 1),
    }


def set_train(model: nn.Module, frozen_bn: bool) -> nn.Module:
    """Training mode; ``frozen_bn`` keeps BatchNorm on its running statistics.  Train-mode BN
    over 2 images of 128 px amplifies float rounding from one step to the next: stock against
    stock with 1e-6 relative noise on the first gradient drifts to ~1e-3 relative by the third
    step, so trajectories are compared with frozen BN (single steps both ways)."""
    model.train()
    if frozen_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance of ``a`` from the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_state_dict(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_grads_close(stock: nn.Module, fused: nn.Module, tol: float = 1e-4) -> None:
    n = 0
    for (name, ps), pf in zip(stock.named_parameters(), fused.parameters()):
        assert (ps.grad is None) == (pf.grad is None), name
        if ps.grad is not None:
            err = (pf.grad.double() - ps.grad.double()).norm().item()
            bound = tol * ps.grad.double().norm().item() + 1e-12
            assert err <= bound, (name, rel(pf.grad, ps.grad))
            n += 1
    assert n > 100  # the whole network's tensors, not only the head's


def head_box_logits(raw: dict | list) -> torch.Tensor:
    """The Detect head's box logits (B, 4 * 16, A) from its raw (second) eval output: a dict
    since ~8.4.1xx (``{"boxes": ...}``, under ``"one2many"`` for end-to-end heads), a list of
    per-level (B, 4 * 16 + C, H, W) maps before."""
    if isinstance(raw, dict):
        raw = raw.get("one2many", raw)
        if isinstance(raw, dict):
            return raw["boxes"]
    return torch.cat([level.flatten(2)[:, : 4 * BINS] for level in raw], 2)


def peakedness(boxes: torch.Tensor) -> tuple[float, float]:
    """(mean top bin probability, std of the top bin) of head box logits (B, 4 * 16, A)."""
    p = boxes.view(boxes.shape[0], 4, BINS, -1).softmax(2)
    return p.amax(2).mean().item(), p.argmax(2).float().std().item()


# --------------------------------------------------------------------------------------------
# patch(): structure


@pytest.mark.parametrize("cfg", CFGS + [E2E_CFG])
def test_patch_keeps_state_dict_and_replaces_dfl(cfg: str) -> None:
    stock = build_stock(cfg)
    model = copy.deepcopy(stock)
    weight = model.model[-1].dfl.conv.weight
    assert patch(model) is model
    assert type(model) is FusedDetectionModel and isinstance(model, DetectionModel)
    assert is_patched(model) and not is_patched(stock)
    dfl = model.model[-1].dfl
    assert type(dfl) is FusedDFL and isinstance(dfl, DFL)
    assert not any(type(m) is DFL for m in model.modules())
    # the same frozen Parameter under the same key
    assert dfl.conv.weight is weight and not weight.requires_grad
    assert DFL_KEY[cfg] in model.state_dict()
    assert torch.equal(model.state_dict()[DFL_KEY[cfg]], torch.arange(16.0).view(1, 16, 1, 1))
    assert_same_state_dict(model, stock)
    # and a state dict loads both ways
    stock2 = build_stock(cfg, seed=1)
    stock2.load_state_dict(model.state_dict())
    assert_same_state_dict(stock2, stock)


def test_patch_twice_unpatch_and_types() -> None:
    stock = build_stock("yolov8n.yaml")
    model = patch(copy.deepcopy(stock))
    set_train(model, frozen_bn=True).loss(make_batch())  # builds the criterion
    dfl, criterion = model.model[-1].dfl, model.criterion
    assert patch(model) is model  # twice: nothing more happens
    assert model.model[-1].dfl is dfl and model.criterion is criterion
    assert type(criterion) is FusedV8DetectionLoss
    assert type(criterion.bbox_loss.dfl_loss) is FusedDFLoss
    assert_same_state_dict(model, stock)

    assert unpatch(model) is model
    assert type(model) is DetectionModel and type(model.model[-1].dfl) is DFL
    assert type(model.criterion) is v8DetectionLoss
    assert type(model.criterion.bbox_loss.dfl_loss) is DFLoss
    assert model.model[-1].dfl.conv.weight is dfl.conv.weight
    assert not is_patched(model)
    assert_same_state_dict(model, stock)
    assert is_patched(patch(model))

    with pytest.raises(TypeError, match="YOLO object or a DetectionModel"):
        patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="trainer class or instance"):
        patch_trainer(nn.Linear)


def test_patch_yolo_object_and_copies() -> None:
    yolo = YOLO("yolov8n.yaml")
    inner = yolo.model
    assert patch(yolo) is yolo
    assert type(yolo) is FusedYOLO and isinstance(yolo, YOLO)
    assert yolo.model is inner and is_patched(yolo) and is_patched(inner)
    # deepcopy (what EMA, validators and the exporter do) keeps the patch
    twin = copy.deepcopy(inner)
    assert type(twin) is FusedDetectionModel and type(twin.model[-1].dfl) is FusedDFL
    assert is_patched(copy.deepcopy(yolo))


def test_unpatched_model_in_same_process_untouched(calls: Calls) -> None:
    patched = patch(YOLO("yolov8n.yaml"))  # another model patched first, in this process
    patched.model.args = get_cfg()
    patched.model.loss(make_batch())
    assert calls.dfl > 0

    yolo = YOLO("yolov8n.yaml")
    model = yolo.model
    model.args = get_cfg()
    before = calls.snapshot()
    assert type(yolo) is YOLO and type(model) is DetectionModel
    assert type(model.model[-1].dfl) is DFL
    model.eval()
    with torch.no_grad():
        model(make_batch()["img"])
    model.train()
    model.loss(make_batch())
    assert type(model.criterion) is v8DetectionLoss
    assert type(model.criterion.bbox_loss.dfl_loss) is DFLoss
    assert calls.snapshot() == before  # not one fused op ran for it
    assert not is_patched(yolo) and not is_patched(model)
    # Ultralytics' classes themselves are untouched (nothing was monkeypatched globally)
    for cls, name in [
        (DFL, "forward"),
        (DFLoss, "__call__"),
        (v8DetectionLoss, "bbox_decode"),
        (DetectionModel, "init_criterion"),
        (DetectionTrainer, "get_model"),
        (BaseTrainer, "save_model"),
        (BaseTrainer, "final_eval"),
        (YOLO, "train"),
        (YOLO, "save"),
    ]:
        attr = getattr(cls, name)
        assert attr.__module__.startswith("ultralytics."), (cls, name, attr.__module__)


# --------------------------------------------------------------------------------------------
# the fused modules on their own


def test_fused_dfl_channel_layout(calls: Calls) -> None:
    """(B, 4 * 16, A), side-major channels: one-hot peaks at known bins decode to those bins."""
    g = torch.Generator().manual_seed(0)
    b, a = 2, 37
    bins = torch.randint(0, BINS, (b, 4, a), generator=g)
    x = torch.full((b, 4, BINS, a), -30.0)
    x.scatter_(2, bins.unsqueeze(2), 30.0)
    x = x.view(b, 4 * BINS, a)
    out = FusedDFL(BINS)(x)
    assert calls.integral == 1
    assert out.shape == (b, 4, a) and out.dtype == x.dtype
    torch.testing.assert_close(out, bins.float(), atol=1e-5, rtol=0)
    # and any logits: the stock module's result, in value, dtype and gradient
    for dtype in (torch.float32, torch.float64):
        x = (4 * torch.randn(b, 4 * BINS, a, generator=g)).to(dtype).requires_grad_()
        xs = x.detach().clone().requires_grad_()
        out, ref = FusedDFL(BINS).to(dtype)(x), DFL(BINS).to(dtype)(xs)
        assert out.dtype == ref.dtype == dtype
        torch.testing.assert_close(out, ref)
        w = torch.randn(ref.shape, generator=g, dtype=dtype)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(x.grad, xs.grad)


def test_fused_dfl_falls_back_for_non_integral_weights(calls: Calls) -> None:
    fused, stock = FusedDFL(BINS), DFL(BINS)
    x = 3 * torch.randn(2, 4 * BINS, 11)
    other = {"conv.weight": torch.linspace(0, 2, BINS).view(1, BINS, 1, 1)}
    stock.load_state_dict(other)
    with pytest.warns(UserWarning, match="not arange"):
        fused.load_state_dict(other)
        out = fused(x)
    assert calls.integral == 0  # the stock formula ran: it honours the loaded weights
    torch.testing.assert_close(out, stock(x))
    fused.load_state_dict({"conv.weight": torch.arange(BINS, dtype=torch.float).view(1, -1, 1, 1)})
    torch.testing.assert_close(fused(x), DFL(BINS)(x))
    assert calls.integral == 1


def test_fused_dfl_under_torch_compile() -> None:
    fused, stock = FusedDFL(BINS), DFL(BINS)
    x = 3 * torch.randn(2, 4 * BINS, 50)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")  # no graph break
    try:
        torch.testing.assert_close(compiled(x), stock(x))
    finally:
        torch.compiler.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_dfloss_matches_stock(dtype: torch.dtype, calls: Calls) -> None:
    """Ultralytics' call: pred (4P, 16), target (P, 4) in bins, including values outside
    [0, 15 - 0.01] (clamped) -> (P, 1), float32 for 16-bit pred; the target is not modified."""
    g = torch.Generator().manual_seed(0)
    p = 300
    pred = (3 * torch.randn(4 * p, BINS, generator=g)).to(dtype).requires_grad_()
    target = torch.empty(p, 4).uniform_(-1, BINS + 1, generator=g)
    target[:4] = torch.tensor([0.0, BINS - 1 - 0.01, BINS - 1, BINS - 0.5])  # edges of the clamp
    target_before = target.clone()
    out = FusedDFLoss(BINS)(pred, target)
    assert calls.dfl == 1
    assert torch.equal(target, target_before)
    assert out.shape == (p, 1)
    assert out.dtype == torch.float32
    # the stock formula on the same (upcast) values: what it computes under autocast
    pred32 = pred.detach().float().requires_grad_()
    ref = DFLoss(BINS)(pred32, target.clone())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.rand(p, 1, generator=g)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert pred.grad.dtype == dtype
    tol = {torch.float32: (1e-5, 1e-7), torch.float16: (1e-3, 1e-6), torch.bfloat16: (1e-2, 1e-5)}
    torch.testing.assert_close(
        pred.grad, pred32.grad.to(dtype), rtol=tol[dtype][0], atol=tol[dtype][1]
    )


def test_fused_dfloss_under_autocast_matches_stock_dtype() -> None:
    pred = 3 * torch.randn(40, BINS)
    target = torch.rand(10, 4) * BINS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = nn.functional.linear(pred, torch.eye(BINS))  # a bf16 activation, as under AMP
        out, ref = FusedDFLoss(BINS)(logits, target), DFLoss(BINS)(logits, target.clone())
    assert logits.dtype == torch.bfloat16
    assert out.dtype == ref.dtype and out.shape == ref.shape == (10, 1)
    # stock's CPU-autocast log_softmax rounds to bf16; the fused op's math is float32 throughout
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(
        out, DFLoss(BINS)(logits.float(), target.clone()), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------------------
# stock vs patched models


@pytest.mark.parametrize("cfg", CFGS + [E2E_CFG])
def test_eval_predictions_equal(cfg: str, calls: Calls) -> None:
    stock, fused = stock_and_fused(cfg)
    img = make_batch()["img"]
    if cfg == E2E_CFG:  # the one-to-many branch first (some releases default to one-to-one)
        stock.model[-1].end2end = fused.model[-1].end2end = False
    with torch.no_grad():
        ys, raw = stock.eval()(img)
        assert calls.integral == 0
        yf, _ = fused.eval()(img)
        assert calls.integral == 1  # the head's DFL, once for the whole batch
        top, spread = peakedness(head_box_logits(raw))
        assert top > 0.4 and spread > 2.5  # the comparison sees peaked, varied distributions
        assert yf.shape == ys.shape == (2, 4 + 80, (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2 + 16)
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-4)  # pixels, up to ~2 * 128
        if cfg == E2E_CFG:  # the one-to-one branch, NMS-free top-k output (B, 300, 6)
            stock.model[-1].end2end = fused.model[-1].end2end = True
            ys, yf = stock(img)[0], fused(img)[0]
            assert yf.shape == ys.shape == (2, 300, 6)
            torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-4)
        # Ultralytics' fuse() (Conv+BN folding; predict and export call it) keeps the patch
        stock.fuse(verbose=False)
        fused.fuse(verbose=False)
        assert is_patched(fused)
        before = calls.integral
        torch.testing.assert_close(fused(img)[0], stock(img)[0], rtol=1e-5, atol=1e-4)
        assert calls.integral == before + 1


@pytest.mark.parametrize("cfg", CFGS + [E2E_CFG])
def test_loss_and_gradients_equal(cfg: str, calls: Calls) -> None:
    stock, fused = stock_and_fused(cfg)
    batch = make_batch()
    for frozen_bn in (False, True):
        losses = []
        for model in (stock, fused):
            set_train(model, frozen_bn).zero_grad()
            before = calls.snapshot()
            loss, items = model.loss(batch)
            loss.sum().backward()
            used = tuple(n - b for n, b in zip(calls.snapshot(), before))
            losses.append((loss.detach(), items, used))
        (ls, items_s, used_s), (lf, items_f, used_f) = losses
        items_s, items_f = loss_parts(items_s), loss_parts(items_f)
        # bbox_decode's integral and the DFL term, per detection loss (E2E: one2many, one2one)
        n_losses = 2 if cfg == E2E_CFG else 1
        assert used_s == (0, 0) and used_f == (n_losses, n_losses)
        assert set(items_f) == set(items_s) == {"box_loss", "cls_loss", "dfl_loss"}
        # (3,) per part since ~8.4.1xx; the sum, shape (), before
        assert lf.shape == ls.shape and lf.numel() in (1, 3) and lf.dtype == ls.dtype
        torch.testing.assert_close(lf, ls, rtol=1e-5, atol=0)
        for k in items_s:
            torch.testing.assert_close(items_f[k], items_s[k], rtol=1e-5, atol=0)
        if frozen_bn:
            assert_grads_close(stock, fused)  # every tensor to 1e-4 relative
        else:
            grads = [
                torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
                for m in (stock, fused)
            ]
            assert rel(grads[1], grads[0]) < 1e-4
    # many positives: one-to-many assignment gave >= 40 anchors' 4 sides to the DFL term
    assert max(calls.dfl_rows) >= 4 * 40
    if cfg == E2E_CFG:
        # E2ELoss since 8.4; E2EDetectLoss before (scripts/check_ultralytics_versions.sh)
        assert type(stock.criterion) is type(fused.criterion)
        assert type(stock.criterion).__name__ in ("E2ELoss", "E2EDetectLoss")
        assert type(stock.criterion.one2one) is v8DetectionLoss
        for criterion in (fused.criterion.one2many, fused.criterion.one2one):
            assert type(criterion) is FusedV8DetectionLoss
            assert type(criterion.bbox_loss.dfl_loss) is FusedDFLoss
    else:
        assert type(stock.criterion) is v8DetectionLoss
        assert type(fused.criterion) is FusedV8DetectionLoss


@pytest.mark.parametrize("cfg", CFGS)
def test_three_sgd_steps_equal(cfg: str) -> None:
    stock, fused = stock_and_fused(cfg, seed=3)
    batches = [make_batch(seed=s) for s in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (stock, fused)]
    for batch in batches:
        losses = []
        for model, opt in zip((stock, fused), opts):
            set_train(model, frozen_bn=True)
            opt.zero_grad()
            loss, _ = model.loss(batch)
            loss.sum().backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    for (name, ps), pf in zip(stock.named_parameters(), fused.parameters()):
        assert rel(pf, ps) < 1e-4, name


def test_empty_targets_and_autocast() -> None:
    stock, fused = stock_and_fused("yolov8n.yaml")
    batch = make_batch()
    empty = dict(
        batch, batch_idx=batch["batch_idx"][:0], cls=batch["cls"][:0], bboxes=batch["bboxes"][:0]
    )
    for model in (stock, fused):
        model.train()
    (ls, items_s), (lf, items_f) = stock.loss(empty), fused.loss(empty)
    # no positives: no DFL term (and no NaN)
    assert loss_parts(items_f)["dfl_loss"] == loss_parts(items_s)["dfl_loss"] == 0
    torch.testing.assert_close(lf, ls)
    lf.sum().backward()  # the predictions stay in the graph
    # bf16 autocast (what CPU AMP would run): same dtypes as stock, values to bf16 accuracy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ls, lf = stock.loss(batch)[0], fused.loss(batch)[0]
    assert lf.dtype == ls.dtype == torch.float32
    torch.testing.assert_close(lf, ls, rtol=2e-2, atol=0)
    lf.sum().backward()


def test_segmentation_model_patched() -> None:
    """A Detect subclass (Segment) holds the same DFL; its loss subclass keeps bbox_decode."""
    torch.manual_seed(0)
    stock = realistic_head(SegmentationModel("yolov8n-seg.yaml", verbose=False))
    stock.args = get_cfg()
    fused = patch(copy.deepcopy(stock))
    assert type(fused.model[-1].dfl) is FusedDFL and isinstance(fused, SegmentationModel)
    img = make_batch()["img"]
    with torch.no_grad():
        ys, yf = stock.eval()(img), fused.eval()(img)
    torch.testing.assert_close(yf[0], ys[0], rtol=1e-5, atol=1e-4)
    criterion = fused.init_criterion()
    assert isinstance(criterion, v8SegmentationLoss) and type(criterion) is not v8SegmentationLoss
    assert type(criterion.bbox_loss.dfl_loss) is FusedDFLoss
    assert_same_state_dict(fused, stock)


def test_reg_max_1_model_warns_and_runs_stock(calls: Calls) -> None:
    """YOLO26 heads regress distances directly (reg_max == 1, no DFL): nothing to fuse."""
    if not (Path(ultralytics.__file__).parent / "cfg/models/26/yolo26.yaml").exists():
        # (never in CI, whose pinned release has it: scripts/check_ultralytics_versions.sh)
        pytest.skip(f"ultralytics {ultralytics.__version__} has no YOLO26 (reg_max 1) model")
    torch.manual_seed(0)
    stock = DetectionModel("yolo26n.yaml", verbose=False)
    stock.args = get_cfg()
    assert stock.model[-1].reg_max == 1
    with pytest.warns(UserWarning, match="no DFL module"):
        fused = patch(copy.deepcopy(stock))
    batch = make_batch()
    set_train(stock, frozen_bn=True)
    set_train(fused, frozen_bn=True)
    torch.testing.assert_close(fused.loss(batch)[0], stock.loss(batch)[0], rtol=0, atol=0)
    assert calls.snapshot() == (0, 0)


# --------------------------------------------------------------------------------------------
# YOLO workflows: predict, save, train, val, export


def test_predict(calls: Calls) -> None:
    stock = YOLO("yolov8n.yaml")
    realistic_head(stock.model)
    fused = patch(copy.deepcopy(stock))
    img = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    rs = stock.predict(img, imgsz=IMGSZ, device="cpu", verbose=False)[0]
    before = calls.integral
    rf = fused.predict(img, imgsz=IMGSZ, device="cpu", verbose=False)[0]
    assert calls.integral > before
    assert is_patched(fused)  # predict fuses Conv+BN in place; the DFL stays fused
    assert len(rs.boxes) > 10
    assert torch.equal(rf.boxes.cls, rs.boxes.cls)
    torch.testing.assert_close(rf.boxes.xyxy, rs.boxes.xyxy, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(rf.boxes.conf, rs.boxes.conf)


def test_save_writes_stock_checkpoint(tmp_path: Path) -> None:
    yolo = patch(YOLO("yolov8n.yaml"))
    yolo.save(tmp_path / "m.pt")
    assert is_patched(yolo)
    assert_stock_checkpoint(tmp_path / "m.pt", "model")
    # torch.save of a patched model is a patched model (it needs gfl_ops to load)
    torch.save(yolo.model, tmp_path / "raw.pt")
    assert is_patched(torch.load(tmp_path / "raw.pt", weights_only=False))


def test_pickled_patched_models_load_in_another_process(tmp_path: Path) -> None:
    """torch.save of patched models (detect, and segment: a class made at import) loads in a
    fresh interpreter, which imports the adapter by itself."""
    for name, cls, cfg in (
        ("det", DetectionModel, "yolov8n.yaml"),
        ("seg", SegmentationModel, "yolov8n-seg.yaml"),
    ):
        torch.save(patch(cls(cfg, verbose=False)), tmp_path / f"{name}.pt")
    code = (
        "import sys, torch\n"
        "for name in ('det', 'seg'):\n"
        "    m = torch.load(sys.argv[1] + f'/{name}.pt', weights_only=False)\n"
        "    print(type(m).__module__, type(m).__name__, type(m.model[-1].dfl).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split("\n")
    module = "gfl_ops.integrations.ultralytics"
    assert out[:2] == [
        f"{module} FusedDetectionModel FusedDFL",
        f"{module} FusedSegmentationModel FusedDFL",
    ], out


def test_adapter_classes_are_found_under_the_public_module() -> None:
    """Pickles record a class's ``__module__`` and name: every class the adapter defines in its
    private modules, or makes, names gfl_ops.integrations.ultralytics and is found there."""
    adapter = sys.modules[patch.__module__]
    classes = {
        obj
        for name, module in list(sys.modules.items())
        if name.startswith(adapter.__name__ + ".")
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__name__.startswith(("Fused", "_Fused"))
    }
    classes |= set(adapter._classes._FUSED.values())
    assert FusedDFL in classes and FusedDetectionTrainer in classes
    for cls in classes:
        assert cls.__module__ == adapter.__name__, cls
        if cls.__name__ != "FusedDetectionTrainer" and issubclass(cls, BaseTrainer):
            continue  # made trainer classes stay off the namespace (cloudpickled by value)
        assert getattr(adapter, cls.__qualname__) is cls, cls


def loss_parts(items: dict[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    """A loss's detached parts by name: a dict since ~8.4.1xx, a (3,) tensor before."""
    if isinstance(items, dict):
        return items
    return dict(zip(("box_loss", "cls_loss", "dfl_loss"), items.unbind()))


def checkpoint_globals(path: Path) -> list[str]:
    """Classes and functions a torch checkpoint's pickle names: torch's listing of those outside
    its weights_only allow-list (torch >= 2.5), else every GLOBAL opcode of torch.save's
    protocol-2 pickle, read with pickletools."""
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        (pkl,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        data = archive.read(pkl)
    names = []
    for op, arg, _ in pickletools.genops(data):
        assert op.name != "STACK_GLOBAL", f"{path}: a protocol >= 4 pickle, not torch.save's"
        if op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
    return names


def assert_stock_checkpoint(path: Path, key: str, model_class: type = DetectionModel) -> None:
    """The checkpoint names no gfl_ops class and loads with Ultralytics' restricted
    (weights_only) loader, as a stock model of ``model_class``."""
    assert not [n for n in checkpoint_globals(path) if "gfl_ops" in n], path
    ckpt, _ = torch_safe_load(path, safe_only=True)
    model = ckpt[key]
    if type(model).__name__ == "SafeClass":
        # releases before ~8.4.1xx: their restricted loader stands in a placeholder for every
        # model class (theirs too), so the classes are read with the full loader
        model = torch_safe_load(path)[0][key]
    assert type(model) is model_class and type(model.model[-1].dfl) is DFL


def write_dataset(root: Path, n_train: int = 4, n_val: int = 2, task: str = "detect") -> Path:
    """A tiny YOLO-format dataset: 128 px images with 3 coloured boxes each, labelled for
    ``task``: boxes (detect), the boxes' outlines as polygons (segment) or as oriented boxes
    (obb, axis-aligned), or boxes with their 4 corners as keypoints (pose)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((IMGSZ, IMGSZ, 3), 40, np.uint8)
            lines = []
            for _ in range(3):
                w, h = rng.integers(20, 60, 2)
                x0, y0 = rng.integers(0, IMGSZ - 60, 2)
                c = int(rng.integers(0, 2))
                img[y0 : y0 + h, x0 : x0 + w] = (220, 40, 40) if c == 0 else (40, 220, 40)
                box = [(x0 + w / 2) / IMGSZ, (y0 + h / 2) / IMGSZ, w / IMGSZ, h / IMGSZ]
                corners = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
                corners = [(x / IMGSZ, y / IMGSZ) for x, y in corners]
                if task in ("segment", "obb"):
                    values = [v for xy in corners for v in xy]
                elif task == "pose":
                    values = box + [v for x, y in corners for v in (x, y, 2)]
                else:
                    values = box
                lines.append(f"{c} " + " ".join(f"{v:.6f}" for v in values))
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    extra = "kpt_shape: [4, 3]\nflip_idx: [1, 0, 3, 2]\n" if task == "pose" else ""
    data.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\n{extra}names:\n  0: red\n  1: green\n"
    )
    return data


# everything that could reach the network or write outside tmp_path is off
TRAIN_ARGS = dict(
    epochs=1,
    imgsz=64,
    batch=2,
    workers=0,
    device="cpu",
    plots=False,
    amp=False,
    val=True,
    verbose=False,
    exist_ok=True,
    seed=0,
)


def test_train_runs_fused_ops(tmp_path: Path, calls: Calls) -> None:
    data = write_dataset(tmp_path / "data")
    yolo = patch(YOLO("yolov8n.yaml"))
    per_batch: list[tuple[int, int]] = []
    per_fit_epoch: list[tuple[int, int]] = []
    yolo.add_callback("on_train_batch_end", lambda trainer: per_batch.append(calls.snapshot()))
    yolo.add_callback("on_fit_epoch_end", lambda trainer: per_fit_epoch.append(calls.snapshot()))

    yolo.train(data=str(data), project=str(tmp_path / "runs"), name="train", **TRAIN_ARGS)

    trainer = yolo.trainer
    assert type(trainer) is FusedDetectionTrainer
    # the model trained, its EMA, and yolo.model (reloaded from best.pt by train()) are patched
    for model in (trainer.model, trainer.ema.ema, yolo.model):
        assert is_patched(model), type(model)
    assert is_patched(yolo)
    assert all(torch.isfinite(v).all() for v in loss_parts(trainer.tloss).values()), trainer.tloss
    # each of the 2 training steps ran the fused DFL loss and integral (bbox_decode)
    assert len(per_batch) == 2
    steps = [(0, 0)] + per_batch
    for (i0, d0), (i1, d1) in zip(steps, steps[1:]):
        assert i1 - i0 >= 1 and d1 - d0 >= 1
    # the epoch's validation and the final validation of best.pt ran the head's fused DFL
    assert len(per_fit_epoch) == 2
    assert per_fit_epoch[0][0] > per_batch[-1][0]
    assert per_fit_epoch[1][0] > per_fit_epoch[0][0]
    # the checkpoints hold the stock classes
    for ckpt in (trainer.best, trainer.last):
        assert_stock_checkpoint(ckpt, "model")

    before = calls.integral
    metrics = yolo.val(
        data=str(data),
        imgsz=64,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        verbose=False,
        project=str(tmp_path / "runs"),
        name="val",
    )
    assert calls.integral > before and metrics is not None
    assert is_patched(yolo)

    # training from a checkpoint (YOLO("yolo11n.pt").train(): the trainer is handed the loaded
    # model as weights) runs the fused ops too
    pretrained = patch(YOLO(str(trainer.best)))
    before = calls.snapshot()
    pretrained.train(data=str(data), project=str(tmp_path / "runs"), name="ft", **TRAIN_ARGS)
    assert is_patched(pretrained.trainer.model) and is_patched(pretrained)
    assert calls.dfl - before[1] >= 2 and calls.integral - before[0] >= 2

    # and so does training the same object again (yolo.model now loaded from best.pt).  Releases
    # before ~8.4 cannot do this even unpatched: the overrides they reload lack "model"
    if "model" in yolo.overrides:
        assert yolo.ckpt
        before = calls.snapshot()
        yolo.train(data=str(data), project=str(tmp_path / "runs"), name="again", **TRAIN_ARGS)
        assert is_patched(yolo.trainer.model) and is_patched(yolo)
        assert calls.dfl - before[1] >= 2 and calls.integral - before[0] >= 2


class _Killed(Exception):
    """Stands for the run being killed after an epoch's checkpoint was written."""


def test_interrupted_training_resumes_fused(tmp_path: Path, calls: Calls) -> None:
    """A run stopped after its first of two epochs (last.pt written) resumes with
    ``patch(YOLO(last.pt)).train(resume=True)``: from epoch 2, with the fused ops, and its
    checkpoints stay stock."""
    data = write_dataset(tmp_path / "data")
    yolo = patch(YOLO("yolov8n.yaml"))

    def kill(trainer) -> None:
        if trainer.epoch == 0:
            raise _Killed

    yolo.add_callback("on_fit_epoch_end", kill)
    args = {**TRAIN_ARGS, "epochs": 2}
    with pytest.raises(_Killed):
        yolo.train(data=str(data), project=str(tmp_path / "runs"), name="run", **args)
    last = tmp_path / "runs" / "run" / "weights" / "last.pt"
    assert_stock_checkpoint(last, "ema")  # a run's checkpoint holds the EMA model (and no "model")
    assert torch_safe_load(last)[0]["epoch"] == 0

    resumed = patch(YOLO(str(last)))
    before = calls.snapshot()
    resumed.train(resume=True)
    trainer = resumed.trainer
    assert type(trainer) is FusedDetectionTrainer and trainer.start_epoch == 1
    assert is_patched(trainer.model) and is_patched(trainer.ema.ema) and is_patched(resumed)
    assert calls.dfl - before[1] >= 2 and calls.integral - before[0] >= 2
    assert trainer.epoch == 1
    assert_stock_checkpoint(last, "model")


@pytest.mark.parametrize("task", ["segment", "pose", "obb"])
def test_train_other_tasks_runs_fused_ops(tmp_path: Path, calls: Calls, task: str) -> None:
    """Segment, pose and OBB models carry the same Detect head and DFL loss: ``train()`` of a
    patched one runs its task's trainer made fused, with the fused ops, and writes stock
    checkpoints.  (OBB keeps its own rotated-box decoding in the loss; its DFL term is fused.)"""
    from ultralytics.nn.tasks import OBBModel, PoseModel

    model_class = {"segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel}[task]
    # batches of 3: 8.4.0's segmentation loss takes a batch of 2 for a (proto, semseg) pair
    data = write_dataset(tmp_path / "data", n_train=6, n_val=3, task=task)
    yolo = patch(YOLO(f"yolov8n-{'seg' if task == 'segment' else task}.yaml"))
    per_batch: list[tuple[int, int]] = []
    yolo.add_callback("on_train_batch_end", lambda trainer: per_batch.append(calls.snapshot()))

    args = {**TRAIN_ARGS, "batch": 3}
    yolo.train(data=str(data), project=str(tmp_path / "runs"), name=task, **args)

    trainer = yolo.trainer
    assert type(trainer).__name__ == f"Fused{type(trainer).__mro__[2].__name__}"
    assert isinstance(trainer.model, model_class)
    for model in (trainer.model, trainer.ema.ema, yolo.model):
        assert is_patched(model), type(model)
    assert all(torch.isfinite(v).all() for v in loss_parts(trainer.tloss).values())
    steps = [(0, 0)] + per_batch
    assert len(per_batch) == 2
    for (i0, d0), (i1, d1) in zip(steps, steps[1:]):
        assert d1 - d0 >= 1, task  # the DFL loss term
        assert i1 - i0 >= (0 if task == "obb" else 1), task  # the loss's box decoding
    assert calls.integral > per_batch[-1][0]  # the head at validation
    for ckpt in (trainer.best, trainer.last):
        assert_stock_checkpoint(ckpt, "model", model_class)


def test_trainer_built_by_user(tmp_path: Path, calls: Calls) -> None:
    """patch_trainer on a trainer instance (or FusedDetectionTrainer for the class)."""
    data = write_dataset(tmp_path / "data")
    trainer = DetectionTrainer(
        overrides=dict(
            model="yolov8n.yaml",
            data=str(data),
            project=str(tmp_path / "runs"),
            name="user",
            **TRAIN_ARGS,
        )
    )
    assert patch_trainer(trainer) is trainer
    assert type(trainer) is FusedDetectionTrainer
    trainer.train()
    assert is_patched(trainer.model) and is_patched(trainer.ema.ema)
    assert calls.dfl >= 2
    assert_stock_checkpoint(trainer.best, "model")


def test_patch_trainer_classes() -> None:
    assert patch_trainer(DetectionTrainer) is FusedDetectionTrainer
    assert patch_trainer(FusedDetectionTrainer) is FusedDetectionTrainer

    class MyTrainer(DetectionTrainer):
        pass

    fused = patch_trainer(MyTrainer)
    assert issubclass(fused, MyTrainer) and fused is patch_trainer(MyTrainer)
    assert fused.get_model is not MyTrainer.get_model
    assert MyTrainer.get_model is DetectionTrainer.get_model  # the user's class is untouched


def onnx_domains(path: Path | str) -> set[str]:
    return {node.domain for node in onnx.load(str(path)).graph.node}


def run_onnx(path: Path | str, x: torch.Tensor) -> np.ndarray:
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_export_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ultralytics' exporter (torch.onnx.export with dynamo=False; ``simplify=False``: onnxslim
    is not installed and Ultralytics would pip-install it) and torch's dynamo exporter."""
    monkeypatch.chdir(tmp_path)  # Ultralytics writes the .onnx next to the model file (cwd)
    yolo = YOLO("yolov8n.yaml")
    realistic_head(yolo.model)
    patch(yolo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx deprecation notes
        path = yolo.export(format="onnx", imgsz=IMGSZ, simplify=False, device="cpu")
    assert Path(path).resolve().parent == tmp_path.resolve()
    assert is_patched(yolo)  # export worked on a copy
    assert onnx_domains(path) <= {"", "ai.onnx"}

    x = make_batch()["img"][:1]
    model = yolo.model.eval()
    with torch.no_grad():
        expected = model(x)[0].numpy()
    np.testing.assert_allclose(run_onnx(path, x), expected, rtol=0, atol=1e-4)

    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return  # torch < 2.5: the TorchScript exporter above is the only one
    # torch's dynamo exporter on the patched model (export mode head: one output tensor);
    # a copy, as Ultralytics does: the head caches tensors made during export
    head_model = copy.deepcopy(model)
    for m in head_model.modules():
        if isinstance(m, Detect):
            m.export = True
    dyn = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head_model, (x,), str(dyn), dynamo=True, opset_version=18, verbose=False)
    assert onnx_domains(dyn) <= {"", "ai.onnx"}
    np.testing.assert_allclose(run_onnx(dyn, x), expected, rtol=0, atol=1e-4)


def test_cli_console_script_is_installed() -> None:
    """pip's install of gfl-ops puts ``gfl-yolo`` beside the interpreter (pyproject's
    [project.scripts]); it answers as ``yolo`` does."""
    script = Path(sys.executable).parent / "gfl-yolo"
    assert script.exists(), f"{script}: reinstall gfl-ops (pip install --no-build-isolation -e .)"
    out = subprocess.run(
        [str(script), "version"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "YOLO_CONFIG_DIR": _CONFIG_DIR, "YOLO_OFFLINE": "1"},
        check=True,
    ).stdout
    assert ultralytics.__version__ in out


# Counts the fused ops' calls in every Python process started with this file's folder on
# PYTHONPATH (Python imports ``sitecustomize`` at start-up), for processes the test does not
# start itself: the tuner's trials.
_COUNTING_SITECUSTOMIZE = """
import atexit, json, os, sys
from gfl_ops import functional
_calls = {"integral": 0, "distribution_focal_loss": 0}
for _name in _calls:
    def _counted(*a, _f=getattr(functional, _name), _n=_name, **k):
        _calls[_n] += 1
        return _f(*a, **k)
    setattr(functional, _name, _counted)
@atexit.register
def _write():
    with open(os.environ["GFL_OPS_TEST_CALLS"], "a") as f:
        f.write(json.dumps({"argv": sys.argv, "calls": _calls}) + "\\n")
"""


@pytest.fixture
def processes_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict]]:
    """Counts the fused ops' calls in every Python process started during the test (a
    ``sitecustomize`` on PYTHONPATH); returns a reader of the records, one per process that
    ended: ``{"argv": sys.argv, "calls": {op: count}}``."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_COUNTING_SITECUSTOMIZE)
    calls_file = tmp_path / "calls.jsonl"
    path = [str(hooks), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    monkeypatch.setenv("GFL_OPS_TEST_CALLS", str(calls_file))
    return lambda: [json.loads(line) for line in calls_file.read_text().splitlines()]


def test_cli_trains_and_validates_with_the_fused_ops(
    tmp_path: Path, processes_calls: Callable[[], list[dict]]
) -> None:
    """``gfl-yolo`` / ``python -m gfl_ops.integrations.ultralytics`` is the ``yolo`` command with
    patched models: ``train`` then ``val`` of the best checkpoint, in a fresh interpreter (the
    CLI changes process-wide state), counting the fused ops' calls there."""
    data = write_dataset(tmp_path / "data")
    args = {k: v for k, v in TRAIN_ARGS.items() if k != "verbose"}
    train = ["train", "model=yolov8n.yaml", f"data={data}", f"project={tmp_path / 'runs'}"]
    train += ["name=cli"] + [f"{k}={v}" for k, v in args.items()]
    best = tmp_path / "runs" / "cli" / "weights" / "best.pt"
    val = ["val", f"model={best}", f"data={data}", "imgsz=64", "batch=2", "workers=0"]
    val += ["device=cpu", "plots=False", f"project={tmp_path / 'runs'}", "name=cli_val"]
    # one process per command: Ultralytics reads its arguments off sys.argv at import, as the
    # real command does
    for argv in (train, val):
        proc = subprocess.run([*FUSED_LAUNCH, *argv], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {r["argv"][1]: r["calls"] for r in processes_calls()}
    # training: the DFL loss and the loss's decoding every step, the head at validation
    assert counts["train"]["distribution_focal_loss"] >= 2 and counts["train"]["integral"] >= 4
    assert counts["val"]["integral"] >= 1 and counts["val"]["distribution_focal_loss"] == 0
    assert_stock_checkpoint(best, "model")


def test_tuner_launches_are_rewritten_and_nothing_else() -> None:
    args = ["train", "model=yolov8n.yaml", "epochs=1"]
    stock = [sys.executable, "-m", "ultralytics.cfg.__init__", *args]
    assert fused_command(stock) == [*FUSED_LAUNCH, *args]
    assert fused_command(("yolo", *args)) == [*FUSED_LAUNCH, *args]
    for other in (
        [sys.executable, "-m", "torch.distributed.run", "x.py"],
        ["git", "status"],
        "yolo",
    ):
        assert fused_command(other) is other


def _stock_tuner_trials_fail() -> bool:
    """Whether this release's own tuner fails every trial: 8.3.2xx-8.4.0 pass the trial's
    ``save_dir`` to a CLI that rejects the key as unknown (fixed by 8.4.100)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_dict_alignment

    tuner = importlib.import_module("ultralytics.engine.tuner")
    if not re.search(r"""\[["']save_dir["']\]\s*=""", inspect.getsource(tuner)):
        return False  # (8.3.1xx passes none; 8.4.1xx's CLI accepts it)
    try:
        check_dict_alignment(dict(DEFAULT_CFG_DICT), {"save_dir": "runs/trial"})
    except (SyntaxError, SystemExit):
        return True
    return False


def test_tune_trains_every_trial_with_the_fused_ops(
    tmp_path: Path, processes_calls: Callable[[], list[dict]]
) -> None:
    """``YOLO.tune()`` trains each trial in a new ``yolo train`` process; for a patched YOLO
    that process is ``gfl-yolo train`` (its calls of the fused ops counted there)."""
    if _stock_tuner_trials_fail():
        pytest.skip(
            f"ultralytics {ultralytics.__version__}'s own tuner fails every trial (its CLI "
            "rejects the save_dir the tuner passes)"
        )
    data = write_dataset(tmp_path / "data")
    tuner = importlib.import_module("ultralytics.engine.tuner")
    trainer = sys.modules[BaseTrainer.__module__]

    yolo = patch(YOLO("yolov8n.yaml"))
    args = {k: v for k, v in TRAIN_ARGS.items() if k != "verbose"}
    yolo.tune(data=str(data), iterations=1, project=str(tmp_path / "runs"), name="tune", **args)

    records = processes_calls()
    trials = [r for r in records if "train" in r["argv"][1:2]]
    assert len(trials) == 1, records
    (trial,) = trials
    assert trial["argv"][0].endswith(os.path.join("ultralytics", "__main__.py")), trial
    assert trial["calls"]["distribution_focal_loss"] >= 2 and trial["calls"]["integral"] >= 4
    # the launches are Ultralytics' own again, and the tuned model is still patched
    for module in (tuner, trainer):  # (8.4.1xx's tuner leaves the launch to engine.trainer)
        assert getattr(module, "subprocess", subprocess) is subprocess, module
    assert is_patched(yolo)


def test_made_trainer_classes_are_found_in_the_processes_they_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``patch_trainer`` publishes a trainer class it makes (WORKERS_ENV), so that a process
    started from this one -- a multi-GPU worker -- finds it by name; one defined in a function
    cannot be imported there and is not published."""
    from ultralytics.models.yolo.segment import SegmentationTrainer

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    made = patch_trainer(SegmentationTrainer)
    code = (
        "from gfl_ops.integrations.ultralytics import FusedSegmentationTrainer as made, "
        "patch_trainer\n"
        "from ultralytics.models.yolo.segment import SegmentationTrainer\n"
        "assert made is patch_trainer(SegmentationTrainer), made\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert made.__name__ == "FusedSegmentationTrainer"
    assert proc.returncode == 0, proc.stderr[-3000:]

    def local_class() -> type:
        class LocalTrainer(DetectionTrainer):
            pass

        return LocalTrainer

    local = patch_trainer(local_class())
    assert local.__name__ not in os.environ[WORKERS_ENV]
    adapter = sys.modules[patch.__module__]
    with pytest.raises(AttributeError, match=local.__name__):
        getattr(adapter, local.__name__)
    # published by a process whose trainer module this one cannot import: said so, by name
    monkeypatch.setenv(WORKERS_ENV, json.dumps({"FusedGone": "no_such_module:Gone"}))
    with pytest.raises(AttributeError, match="FusedGone.*no_such_module:Gone"):
        adapter.FusedGone  # noqa: B018  (the lookup is the test)


# a trainer class of the user's own, in a module of the user's project
_USER_TRAINERS = """
from ultralytics.models.yolo.detect import DetectionTrainer


class MyTrainer(DetectionTrainer):
    pass
"""


@pytest.mark.parametrize(
    "trainer_class",
    ["FusedDetectionTrainer", "patch_trainer(MyTrainer)", "patch_trainer(script's class)"],
)
def test_ddp_worker_trains_with_the_fused_ops(
    tmp_path: Path,
    processes_calls: Callable[[], list[dict]],
    monkeypatch: pytest.MonkeyPatch,
    trainer_class: str,
) -> None:
    """Multi-GPU training: Ultralytics' trainer writes a worker script
    (``ultralytics.utils.dist.generate_ddp_file``) that ``torch.distributed.run`` starts once per
    GPU, and the worker rebuilds the trainer there -- by importing its class by name (releases up
    to 8.4.1xx) or from a cloudpickle of the class and model (since).  A class that
    ``patch_trainer`` makes at run time must be found there too.  No GPU here, so the script runs
    as one process on the CPU (no process group: the trainer then trains in-process); what it
    shows is that the rebuilt trainer trains with the fused ops."""
    from ultralytics.utils.dist import generate_ddp_file

    if trainer_class == "FusedDetectionTrainer":
        cls = FusedDetectionTrainer
    elif trainer_class == "patch_trainer(script's class)":
        # a class defined in the user's training script: importable nowhere else, so a worker
        # can only get it by value -- which releases that import the class by name cannot do,
        # patched or not
        if "cloudpickle" not in inspect.getsource(generate_ddp_file):
            pytest.skip(
                f"ultralytics {ultralytics.__version__}'s DDP worker imports the trainer class "
                "by name: a class defined in a script cannot be found there"
            )
        script_class = type("ScriptTrainer", (DetectionTrainer,), {"__module__": "__main__"})
        cls = patch_trainer(script_class)
        assert cls.__name__ not in os.environ.get(WORKERS_ENV, "")
    else:
        project = tmp_path / "project"
        project.mkdir()
        (project / "user_trainers.py").write_text(_USER_TRAINERS)
        monkeypatch.syspath_prepend(str(project))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(project), os.environ["PYTHONPATH"]]))
        monkeypatch.delenv(WORKERS_ENV, raising=False)
        cls = patch_trainer(importlib.import_module("user_trainers").MyTrainer)
        assert cls.__name__ == "FusedMyTrainer" and "FusedMyTrainer" in os.environ[WORKERS_ENV]
    data = write_dataset(tmp_path / "data")
    args = {k: v for k, v in TRAIN_ARGS.items() if k != "verbose"}
    trainer = cls(
        overrides=dict(
            model="yolov8n.yaml", data=str(data), project=str(tmp_path / "runs"), name="ddp", **args
        )
    )
    trainer.model = trainer.get_model(cfg="yolov8n.yaml", verbose=False)
    script = generate_ddp_file(trainer)
    try:
        proc = subprocess.run(
            [sys.executable, script], capture_output=True, text=True, timeout=600, cwd=tmp_path
        )
    finally:
        for leftover in (Path(script), Path(script).with_suffix(".pt")):
            leftover.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (worker,) = [r for r in processes_calls() if r["argv"][0] == script]
    assert worker["calls"]["distribution_focal_loss"] >= 2 and worker["calls"]["integral"] >= 4
    assert_stock_checkpoint(tmp_path / "runs" / "ddp" / "weights" / "last.pt", "model")
