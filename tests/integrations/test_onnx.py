"""ONNX export, verified in onnxruntime: gfl_ops.Integral alone and the project's detector.

Both of the exporters torch 2.14 offers are run: the TorchScript-based one (``dynamo=False``) and
the ``torch.export``-based one (``dynamo=True``, onnxscript).  Each graph must hold
standard-domain operators only (the fused op has no ONNX symbolic: the modules lower it to
Softmax + MatMul under export) and give PyTorch's outputs within abs 1e-4.  The patched YOLOv8n
export is tested with the Ultralytics adapter (test_ultralytics.py).
"""

from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from gfl_testing import needs_detector_torch

import gfl_ops

# torch.onnx.export's dynamo= came with torch 2.5 (gfl_ops itself runs on 2.1)
HAS_DYNAMO_EXPORTER = "dynamo" in inspect.signature(torch.onnx.export).parameters
needs_dynamo_exporter = pytest.mark.skipif(
    not HAS_DYNAMO_EXPORTER, reason=f"torch {torch.__version__}'s onnx.export has no dynamo="
)
EXPORTERS = [
    pytest.param(False, id="torchscript"),
    pytest.param(True, id="dynamo", marks=needs_dynamo_exporter),
]
STANDARD_DOMAINS = {"", "ai.onnx"}


def _run(path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _op_types_and_domains(path) -> tuple[set[str], set[str]]:
    graph = onnx.load(str(path)).graph
    return {n.op_type for n in graph.node}, {n.domain for n in graph.node}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("layout", ["flat", "split"])
def test_integral_module_exports_and_runs(tmp_path, dynamo, layout):
    module = gfl_ops.Integral(reg_max=16).eval()
    gen = torch.Generator().manual_seed(0)
    shape = (37, 68) if layout == "flat" else (37, 4, 17)
    x = torch.randn(*shape, generator=gen) * 4  # peaked, varied distributions
    path = tmp_path / "integral.onnx"
    options = {"dynamo": dynamo, "external_data": False} if HAS_DYNAMO_EXPORTER else {}
    torch.onnx.export(
        module,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["distances"],
        opset_version=18,
        **options,
    )
    ops, domains = _op_types_and_domains(path)
    assert domains <= STANDARD_DOMAINS, domains
    assert {"Softmax", "MatMul"} <= ops, ops
    (out,) = _run(path, {"x": x.numpy()})
    np.testing.assert_allclose(out, module(x).numpy(), rtol=0, atol=1e-4)
    assert out.shape == (37, 4)


@needs_detector_torch
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_detector_exports_and_runs(tmp_path, dynamo):
    from detector.export import DenseDetections, export_onnx
    from detector.models import build_detector

    torch.manual_seed(0)
    model = build_detector(depth=18, num_classes=3, pretrained=None).eval()
    with torch.no_grad():  # realistic box distributions: spread the regression logits
        for conv in model.head.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.out_channels == 4 * 17:
                conv.weight.mul_(10.0)  # logits std ~3: peaked, varied
    images = torch.randn(2, 3, 96, 128)
    path = export_onnx(model, tmp_path / "gfl.onnx", image_size=(96, 128), batch=2, dynamo=dynamo)
    ops, domains = _op_types_and_domains(path)
    assert domains <= STANDARD_DOMAINS, domains
    assert {"Softmax", "MatMul"} <= ops, ops
    scores, boxes = _run(path, {"images": images.numpy()})
    with torch.no_grad():
        want_scores, want_boxes = DenseDetections(model)(images)
    np.testing.assert_allclose(scores, want_scores.numpy(), rtol=0, atol=1e-4)
    # boxes are in pixels (up to ~2,000 at stride 128, where float32's spacing is 1.2e-4):
    # compare them in units of their anchor's stride, the integral's own unit
    anchors = model.anchor_generator([tuple(m.shape[-2:]) for m in model.forward_head(images).cls])
    stride = anchors.strides[None, :, None].numpy()
    np.testing.assert_allclose(boxes / stride, want_boxes.numpy() / stride, rtol=0, atol=1e-4)
    spread = want_boxes[..., 2:] - want_boxes[..., :2]
    assert spread.std() > 1.0  # the distributions were not uniform: the comparison means something


@needs_detector_torch
@needs_dynamo_exporter
def test_export_leaves_the_model_usable(tmp_path):
    """Anchors built while tracing are not cached: an export used to leave traced tensors in the
    anchor cache, breaking the next eager call with the same image size."""
    from detector.export import export_onnx
    from detector.models import build_detector

    model = build_detector(depth=18, num_classes=3, pretrained=None).eval()
    export_onnx(model, tmp_path / "gfl.onnx", image_size=(64, 64), dynamo=True)
    assert (
        type(model.anchor_generator([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]).boxes) is torch.Tensor
    )
    detections = model.predict(torch.randn(1, 3, 64, 64))
    assert set(detections[0]) >= {"boxes", "scores", "labels"}
