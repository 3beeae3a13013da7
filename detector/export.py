"""ONNX export of the detector: dense, pre-NMS outputs in standard ONNX operators.

What is exported is the network up to the decoded boxes, the part that runs on an accelerator:
backbone, FPN, head, the softmax-integral of the box distributions and the box decoding.  The
score threshold, top-k and NMS of :meth:`GFLDetector.predict` are data-dependent and left to
the runtime (onnxruntime / TensorRT have their own NMS), as detection exporters usually do.

The fused integral has no ONNX symbolic; under export :class:`detector.models.coder.BoxCoder`
lowers it to Softmax + MatMul (``torch.onnx.is_in_onnx_export()``), so the graph holds only
standard-domain operators.  Anchors are constants of the export's image size.

Usage::

    python -m detector.export --checkpoint runs/x/checkpoint.pt --out gfl.onnx --size 320 320
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from detector.models.detector import GFLDetector
from detector.models.gfl_head import flatten_levels

__all__ = ["DenseDetections", "export_onnx"]


class DenseDetections(nn.Module):
    """``images (B, 3, H, W)`` -> ``(scores (B, A, C), boxes (B, A, 4))`` for every anchor.

    ``scores`` are the joint class-quality scores (sigmoid of the classification branch; times
    the centerness for the ATSS-style variants), ``boxes`` xyxy in input pixels, not clipped.
    Both float32 for a float32 model.  A = anchors over P3..P7 for the image size.
    """

    def __init__(self, detector: GFLDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outs = self.detector.forward_head(images)
        sizes = [tuple(int(s) for s in m.shape[-2:]) for m in outs.cls]
        anchors = self.detector.anchor_generator(sizes, images.device, images.dtype)
        scores = flatten_levels(outs.cls).sigmoid()
        if outs.centerness is not None:
            scores = scores * flatten_levels(outs.centerness).sigmoid()
        reg = flatten_levels(outs.reg)
        batch, num_anchors = reg.shape[:2]
        strides = anchors.strides.repeat(batch)
        boxes = self.detector.coder.decode(
            anchors.boxes.repeat(batch, 1), strides, reg.reshape(batch * num_anchors, -1)
        )
        return scores, boxes.reshape(batch, num_anchors, 4)


def export_onnx(
    detector: GFLDetector,
    path: str | Path,
    image_size: tuple[int, int] = (320, 320),
    batch: int = 1,
    dynamo: bool = False,
    opset: int = 18,
) -> Path:
    """Write ``detector`` as an ONNX file of :class:`DenseDetections`.

    Args:
        detector: a built (and usually trained) detector; exported in eval mode on its device.
        path: the .onnx file to write.
        image_size: (H, W) of the (padded) input the graph is traced for.
        batch: batch size of the traced input.
        dynamo: use torch's ``torch.export``-based exporter (True) or the TorchScript one.
        opset: ONNX opset version.

    Returns:
        The path written.  Inputs: ``images``; outputs: ``scores``, ``boxes``.
    """
    path = Path(path)
    was_training = detector.training
    detector.eval()
    device = next(detector.parameters()).device
    images = torch.zeros(batch, 3, *image_size, device=device)
    try:
        torch.onnx.export(
            DenseDetections(detector),
            (images,),
            str(path),
            dynamo=dynamo,
            input_names=["images"],
            output_names=["scores", "boxes"],
            opset_version=opset,
            external_data=False,
        )
    finally:
        detector.train(was_training)
    return path


def main(argv: list[str] | None = None) -> None:
    from detector.checkpoint import load_for_inference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by training")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--size", type=int, nargs=2, default=(320, 320), metavar=("H", "W"))
    parser.add_argument("--dynamo", action="store_true", help="torch.export-based exporter")
    args = parser.parse_args(argv)
    model, _ = load_for_inference(args.checkpoint, device="cpu")
    print(export_onnx(model, args.out, tuple(args.size), dynamo=args.dynamo))


if __name__ == "__main__":
    main()
