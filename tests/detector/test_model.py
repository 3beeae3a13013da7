"""Detector architecture: shapes, parameter count, freezing, anchors, config and weights loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detector.models import VARIANTS, GFLDetector, ModelConfig, build_detector
from detector.models.anchors import AnchorGenerator
from detector.models.backbone import ResNetBackbone
from detector.models.gfl_head import flatten_levels

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def small(**kw) -> GFLDetector:
    """ResNet-18 with a 64-channel FPN and head: the real structure at a fraction of the cost."""
    cfg = dict(depth=18, num_classes=3, fpn_channels=64, feat_channels=64, gn_groups=16)
    cfg.update(kw)
    return build_detector(cfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_head_output_shapes_per_level(variant):
    torch.manual_seed(0)
    model = small(variant=variant).eval()
    h, w = 72, 100
    outs = model(torch.randn(2, 3, h, w))
    reg_ch = 4 * 17 if variant in ("gfl", "dfl") else 4
    assert len(outs.cls) == len(outs.reg) == 5
    for level, s in enumerate((8, 16, 32, 64, 128)):
        fh, fw = -(-h // s), -(-w // s)
        assert outs.cls[level].shape == (2, 3, fh, fw)
        assert outs.reg[level].shape == (2, reg_ch, fh, fw)
        if variant in ("atss", "dfl"):
            assert outs.centerness[level].shape == (2, 1, fh, fw)
    assert (outs.centerness is None) == (variant in ("gfl", "qfl"))


def test_gfl_r50_parameter_count():
    """GFL-R50-FPN, 80 classes, reg_max 16: 32.44 M (ResNet-50 23.51 M without fc, FPN 3.87 M,
    head 5.06 M), frozen stages included."""
    model = build_detector(depth=50, num_classes=80)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    total = count(model)
    assert abs(total - 32.44e6) / 32.44e6 < 0.005, total
    assert total == 32_440_537
    assert count(model.backbone) == 23_508_032
    assert count(model.neck) == 3_868_672
    assert count(model.head) == 5_063_833


def test_initialisation():
    torch.manual_seed(0)
    model = small(num_classes=80)
    head = model.head
    prior = torch.sigmoid(head.cls_out.bias)
    assert torch.allclose(prior, torch.full_like(prior, 0.01), atol=1e-6)
    assert abs(head.reg_out.weight.std().item() - 0.01) < 0.002
    assert head.reg_out.bias.abs().max() == 0
    assert all(s.scale.item() == 1.0 for s in head.scales)
    gn = [m for m in head.cls_convs if isinstance(m, nn.GroupNorm)]
    assert len(gn) == 4 and all(m.num_groups == 16 for m in gn)
    assert all(m.bias is None for m in head.cls_convs if isinstance(m, nn.Conv2d))


def test_frozen_stem_stage1_and_norm_eval():
    backbone = ResNetBackbone(depth=18, frozen_stages=1, norm_eval=True)
    backbone.train()
    frozen = [backbone.conv1, backbone.bn1, backbone.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    # BN statistics must not move in a training forward pass
    before = backbone.layer3[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, backbone.layer3[0].bn1.running_mean)
    # with norm_eval=False, unfrozen BN trains but the frozen stage stays in eval mode
    backbone = ResNetBackbone(depth=18, frozen_stages=1, norm_eval=False).train()
    assert backbone.layer2[0].bn1.training and not backbone.layer1[0].bn1.training


def test_backbone_channels():
    for depth, chans in ((18, (128, 256, 512)), (50, (512, 1024, 2048))):
        bb = ResNetBackbone(depth=depth).eval()
        feats = bb(torch.randn(1, 3, 64, 64))
        assert [f.shape[1] for f in feats] == list(chans) == list(bb.out_channels)
        assert [f.shape[-1] for f in feats] == [8, 4, 2]


def test_anchors_match_mmdetection_generator():
    gen = AnchorGenerator((8, 16, 32, 64, 128), octave_base_scale=8.0)
    anchors = gen([(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)])
    assert anchors.num_level_anchors == [6, 2, 1, 1, 1]
    # P3 location (x=2, y=1): centre (16, 8), side 64; row-major order
    assert anchors.boxes[1 * 3 + 2].tolist() == [16 - 32, 8 - 32, 16 + 32, 8 + 32]
    assert anchors.boxes[6 + 1].tolist() == [16 - 64, -64, 16 + 64, 64]
    assert anchors.strides.tolist() == [8] * 6 + [16] * 2 + [32, 64, 128]
    flags = gen.valid_flags(anchors, torch.tensor([[16, 24], [9, 9]]))
    # image 1 (9 x 9 px) covers ceil(9/8) = 2 columns and 2 rows of P3
    assert flags[0, :6].tolist() == [True] * 6
    assert flags[1, :6].tolist() == [True, True, False, True, True, False]


def test_flatten_levels_order():
    a = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).float()
    flat = flatten_levels([a, a[:, :, :1, :1]])
    assert flat.shape == (2, 5, 3)
    assert flat[1, 2].tolist() == a[1, :, 1, 0].tolist()  # location y=1, x=0 is index 2


def test_config_dict_dataclass_and_errors():
    m = build_detector({"depth": 18, "num_classes": 5, "variant": "atss"})
    assert isinstance(m.cfg, ModelConfig) and m.cfg.num_classes == 5
    assert m.loss_names == ["loss_cls", "loss_bbox", "loss_centerness", "loss"]
    assert build_detector(ModelConfig(depth=18, num_classes=2), reg_max=8).head.reg_channels == 36
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        build_detector({"depht": 18})
    with pytest.raises(ValueError, match="variant"):
        ModelConfig(variant="fcos")
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=152)


def test_pretrained_from_local_file(tmp_path):
    import torchvision

    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # includes fc.*, which the loader drops
    bb = ResNetBackbone(depth=18, pretrained=str(path))
    assert torch.equal(bb.layer3[1].conv2.weight, net.layer3[1].conv2.weight)
    # an mmdetection-style checkpoint: {'state_dict': {'backbone.…': …}}
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()}}, path)
    bb = ResNetBackbone(depth=18, pretrained=str(path))
    assert torch.equal(bb.conv1.weight, net.conv1.weight)
    with pytest.raises(RuntimeError, match="does not fit a ResNet-50"):
        ResNetBackbone(depth=50, pretrained=str(path))


def test_pretrained_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="resnet50.pth.*pretrained=None"):
        build_detector(depth=18, pretrained=str(missing))


def test_pretrained_download_failure_is_explained(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="local path"):
        ResNetBackbone(depth=18, pretrained="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="unknown torchvision weights"):
        ResNetBackbone(depth=18, pretrained="IMAGENET9K")


@pytest.mark.slow
def test_gfl_r50_train_step_512_on_cpu_backend():
    """Issue #4's acceptance check: one SGD step of GFL-R50-FPN (80 classes, the 256-channel
    recipe) on a 2-image 512x512 batch, with QFL, DFL and the integral on gfl_ops' C++ CPU
    backend."""
    import gfl_ops

    if "cpu" not in gfl_ops.available_backends("cpu"):
        pytest.skip("gfl_ops C++ extension not built: " + gfl_ops.backend_status()["cpu"])
    torch.manual_seed(0)
    model = build_detector(depth=50, num_classes=80, gfl_backend="cpu").train()
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
    )
    images = torch.randn(2, 3, 512, 512)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 160.0, 280.0], [300.0, 30.0, 490.0, 370.0]]),
            "labels": torch.tensor([0, 17]),
        },
        {"boxes": torch.tensor([[50.0, 50.0, 100.0, 120.0]]), "labels": torch.tensor([79])},
    ]
    before = model.head.reg_out.weight.detach().clone()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_dfl", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    assert not torch.equal(before, model.head.reg_out.weight)
    dets = model.eval().predict(images[:1])
    assert dets[0]["boxes"].shape[1] == 4
