"""Feature pyramid: P3-P5 from C3-C5 plus P6, P7 by stride-2 convs on the FPN output.

mmdetection's ``FPN(start_level=1, add_extra_convs='on_output', num_outs=5)``: 1x1 laterals,
top-down nearest upsampling to the lateral's size, 3x3 output convs, then two 3x3 stride-2 convs
(P6 from P5's output, P7 from P6, no ReLU in between).  Xavier-uniform init, zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPN"]


class FPN(nn.Module):
    """``forward([C3, C4, C5]) -> [P3, P4, P5, P6, P7]``, each (B, out_channels, H_l, W_l).

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every pyramid level (256 in the GFL recipe).
        num_extra: stride-2 levels added on top of P5 (2 gives P6 and P7).
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int = 256, num_extra: int = 2
    ) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.extra_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_extra)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # size= rather than scale_factor=2 so odd feature sizes line up
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        for conv in self.extra_convs:
            outs.append(conv(outs[-1]))
        return outs
