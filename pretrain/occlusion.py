"""ADIOS's occlusion network (Shi et al., ICML 2022) and its sparsity penalty, as pure pieces.

The network is a small UNet over the (normalized) view: ``log2(size) - 1`` encoder blocks of conv3x3 +
GroupNorm/InstanceNorm + ReLU with nearest 2x downsampling between them, an MLP bottleneck on the
flattened coarsest map, the mirrored decoder with skip connections, and a 1x1 head whose softmax over
``N`` channels splits every pixel among ``N`` masks (they sum to one per pixel). A masked view is
``x * (1 - m_n)``: mask ``n`` occludes what it covers, in soft proportion.

The sparsity penalty ``mean_b 1 / sin(pi * s_bn)`` (``s_bn`` the fraction of image ``b`` that mask ``n``
covers) is smallest at half coverage and grows without bound as a mask covers nothing or everything,
so the adversary cannot win by occluding the whole image (or by leaving masks empty).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("gn", "in", "none")


def unet_depth(image_size: int) -> int:
    """ADIOS's number of UNet blocks for an image size: ``floor(log2(size)) - 1`` (5 at 64 px, 6 at 224)."""
    if image_size < 8:
        raise ValueError(f"the occlusion UNet needs images of at least 8 px, got {image_size}")
    return int(math.floor(math.log2(image_size))) - 1


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(math.gcd(8, channels), channels)  # 8 groups, as ADIOS, when the width allows
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def conv_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """conv3x3 (stride 1, padding 1) + norm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=norm == "none"),
        _norm(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class OcclusionNetwork(nn.Module):
    """(B, C, H, W) views -> (B, N, H, W) soft masks that sum to one over ``N`` at every pixel.

    ``width`` is the base number of channels (ADIOS's ``mask_fbase``, 8-32): the first blocks have
    ``width`` channels, the three deepest ``2 * width``. The bottleneck MLP (``bottleneck_dim`` hidden
    units) sees the whole coarsest map, so the network is built for one ``image_size``.
    """

    def __init__(self, image_size: int, num_masks: int = 4, width: int = 32, norm: str = "gn",
                 bottleneck_dim: int = 128, in_channels: int = 3):
        super().__init__()
        if num_masks < 2:
            raise ValueError(f"ADIOS needs at least 2 masks to partition an image, got num_masks={num_masks}")
        if norm not in NORMS:
            raise ValueError(f"occlusion network norm must be one of {NORMS}, got '{norm}'")
        if width < 1:
            raise ValueError(f"occlusion network width must be >= 1, got {width}")
        self.image_size, self.num_masks = int(image_size), int(num_masks)
        depth = unet_depth(self.image_size)
        widths = [width if (i == 0 or i < depth - 3) else 2 * width for i in range(depth)]
        self.sizes = [self.image_size]
        for _ in range(depth - 1):
            self.sizes.append(self.sizes[-1] // 2)
        self.down = nn.ModuleList(
            conv_block(c_in, c_out, norm) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        coarse = widths[-1] * self.sizes[-1] ** 2
        self.bottleneck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(coarse, bottleneck_dim), nn.ReLU(inplace=True),
            nn.Linear(bottleneck_dim, bottleneck_dim), nn.ReLU(inplace=True),
            nn.Linear(bottleneck_dim, coarse), nn.ReLU(inplace=True),
        )
        up_out = [widths[depth - 2 - i] for i in range(depth - 1)] + [width]
        up_in = [widths[-1], *up_out[:-1]]
        self.up = nn.ModuleList(
            conv_block(c_up + widths[depth - 1 - i], c_out, norm)
            for i, (c_up, c_out) in enumerate(zip(up_in, up_out))
        )
        self.head = nn.Conv2d(width, self.num_masks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"the occlusion network was built for {self.image_size} px views, got "
                             f"{tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            skips.append(x)
            if i < len(self.down) - 1:
                x = F.interpolate(x, size=(self.sizes[i + 1],) * 2, mode="nearest")
        x = self.bottleneck(x).view_as(skips[-1])
        for i, block in enumerate(self.up):
            x = block(torch.cat([x, skips[-1 - i]], dim=1))
            if i < len(self.up) - 1:
                x = F.interpolate(x, size=skips[-2 - i].shape[-2:], mode="nearest")
        return self.head(x).float().softmax(dim=1)


def mask_fractions(masks: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) masks -> (B, N): the fraction of each image that each mask covers."""
    return masks.float().mean(dim=(-2, -1))


def sparsity_penalty(fractions: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """ADIOS's penalty on (B, N) mask fractions: ``sum_n mean_b 1 / sin(pi * s_bn)``.

    Summed over the masks like the SSL loss it is traded against; each term is 1 at half coverage and
    grows without bound toward an empty or a full mask (``eps`` keeps exactly 0 or 1 finite but huge).
    """
    fractions = fractions.to(torch.promote_types(fractions.dtype, torch.float32))  # bf16/fp16 -> fp32
    return (1.0 / (torch.sin(math.pi * fractions) + eps)).mean(dim=0).sum()


def occlude(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``x * (1 - m)`` for (B, C, H, W) views and (B, H, W) masks."""
    return images * (1.0 - masks[:, None].to(images.dtype))


def pick_masks(masks: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) masks and (B,) mask indices -> (B, H, W): one mask per sample (ADIOS-s)."""
    index = choice.to(masks.device).view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:])
    return masks.gather(1, index)[:, 0]
