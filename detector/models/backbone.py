"""torchvision ResNet trunk returning C3-C5, with mmdetection's freezing rules.

``frozen_stages=k`` freezes the stem and stages 1..k (parameters get ``requires_grad=False`` and
the modules stay in eval mode); ``norm_eval=True`` keeps every BatchNorm in eval mode while
training, so batch statistics of small detection batches never overwrite ImageNet ones.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["ResNetBackbone", "load_pretrained_resnet"]

_OUT_CHANNELS = {
    18: (128, 256, 512),
    34: (128, 256, 512),
    50: (512, 1024, 2048),
    101: (512, 1024, 2048),
}
_WEIGHTS_ENUM = {
    18: "ResNet18_Weights",
    34: "ResNet34_Weights",
    50: "ResNet50_Weights",
    101: "ResNet101_Weights",
}


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50/101 without the classifier.

    ``forward(x (B, 3, H, W)) -> [C3 (B, c3, H/8, W/8), C4 (…, H/16, …), C5 (…, H/32, …)]``
    with channels ``out_channels``.

    Args:
        depth: 18, 34, 50 or 101.
        frozen_stages: -1 freezes nothing, 0 the stem, k the stem and stages 1..k.
        norm_eval: keep BatchNorm layers in eval mode in ``train()``.
        pretrained: see :func:`load_pretrained_resnet`; ``None`` keeps the random init.
    """

    def __init__(
        self,
        depth: int = 50,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        pretrained: Any = None,
    ) -> None:
        super().__init__()
        if depth not in _OUT_CHANNELS:
            raise ValueError(f"depth must be one of {sorted(_OUT_CHANNELS)}, got {depth}")
        # mmdetection initialises the last BN of each residual block to zero when training from
        # scratch; with frozen (eval-mode) BN this also keeps random-init activations bounded.
        net = getattr(torchvision.models, f"resnet{depth}")(
            weights=None, zero_init_residual=pretrained is None
        )
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.out_channels: tuple[int, int, int] = _OUT_CHANNELS[depth]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        if pretrained is not None:
            load_pretrained_resnet(self, pretrained, depth)
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods += [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        if mode:
            self._freeze()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def _fetch_torchvision_weights(spec: Any, depth: int) -> dict[str, Tensor]:
    """Resolve ``spec`` (a WeightsEnum, 'torchvision', 'torchvision://resnet50', 'DEFAULT',
    'IMAGENET1K_V1' or 'ResNet50_Weights.IMAGENET1K_V1') and fetch its state dict."""
    from torchvision.models import get_weight

    enum_name = _WEIGHTS_ENUM[depth]
    if isinstance(spec, str):
        name = spec
        if name in ("torchvision", f"torchvision://resnet{depth}"):
            name = "DEFAULT"
        if "." not in name:
            name = f"{enum_name}.{name}"
        try:
            weights = get_weight(name)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"unknown torchvision weights {spec!r} for ResNet-{depth}; use e.g. "
                f"'{enum_name}.IMAGENET1K_V1' or a local checkpoint path"
            ) from exc
    else:
        weights = spec
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - network, hash or disk errors all end here
        url = getattr(weights, "url", "?")
        raise RuntimeError(
            f"could not obtain torchvision weights {weights} ({url}): {type(exc).__name__}: "
            f"{exc}. Without network access, download that file elsewhere and pass its local path "
            "as the model's `pretrained` option (e.g. --pretrained /path/resnet50.pth), or set "
            "pretrained=None to train from random initialisation."
        ) from exc


def load_pretrained_resnet(backbone: ResNetBackbone, spec: Any, depth: int) -> None:
    """Load ImageNet weights into ``backbone``.

    Args:
        spec: a path to a local checkpoint (a state dict, or a dict holding one under
            'state_dict' or 'model'; torchvision or mmdetection ``backbone.`` key names), or a
            torchvision weights enum / name (see :func:`_fetch_torchvision_weights`).

    Raises:
        FileNotFoundError: the path does not exist.  RuntimeError: torchvision weights cannot be
        downloaded, or the checkpoint does not fit a ResNet-``depth``.
    """
    is_path = isinstance(spec, (str, os.PathLike)) and (
        os.sep in str(spec) or str(spec).endswith((".pth", ".pt", ".bin")) or os.path.exists(spec)
    )
    if is_path:
        path = os.fspath(spec)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained backbone checkpoint not found: {path!r}. Pass the path of a local "
                f"ImageNet ResNet-{depth} checkpoint (e.g. torchvision's "
                f"{_WEIGHTS_ENUM[depth]}.IMAGENET1K_V1 file), or pretrained=None for random "
                "initialisation."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    else:
        state = _fetch_torchvision_weights(spec, depth)
        path = str(spec)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches, e.g. a ResNet-18 file for a ResNet-50
        raise RuntimeError(
            f"checkpoint {path!r} does not fit a ResNet-{depth} backbone: {exc}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path!r} does not fit a ResNet-{depth} backbone: missing keys "
            f"{result.missing_keys[:5]}{'…' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected keys {result.unexpected_keys[:5]}"
            f"{'…' if len(result.unexpected_keys) > 5 else ''}"
        )
