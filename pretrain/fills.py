"""How masked pixels are filled: the paper's three strategies (SPEC 1.3), batched.

Each fill returns the replacement image for the whole batch; :mod:`pretrain.masking` writes it only into
the masked pixels. All act on normalized (N, C, H, W) views.

* ``hp`` Gaussian noise (std 0.18 for the query, 0.14 for hard negatives) on high-pass filtered views.
  A spatial mask shares one noise plane across channels; a channel-wise mask draws noise per channel.
* ``blur`` the view blurred with a strong Gaussian (kernel 31, sigma 10 at 224 px, scaled with the image
  size). Blurring commutes with per-channel normalization, so blurring the normalized view equals
  normalizing the blurred image.
* ``mean`` the per-image, per-channel mean of the view, taken before masking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("hp", "blur", "mean")


def noise_fill(shape: torch.Size | tuple[int, ...], std: float, channelwise: torch.Tensor,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, C, H, W) zero-mean Gaussian noise; rows where ``channelwise`` is False repeat channel 0."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype) * std
    return torch.where(channelwise[:, None, None, None], noise, noise[:, :1].expand_as(noise))


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (the same result as torchvision's ``gaussian_blur``,
    which convolves with the full 2-D kernel: a 31-tap blur is 15x cheaper done in two passes)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1:
        return images
    n, c, h, w = images.shape
    kernel = gaussian_kernel1d(kernel_size, sigma, images.device, images.dtype)
    pad = kernel_size // 2
    if pad >= h or pad >= w:  # reflect padding needs pad < size; fall back to replicate on tiny images
        mode = "replicate"
    else:
        mode = "reflect"
    flat = images.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode=mode), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def blur_fill(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    return gaussian_blur(images, kernel_size, sigma)


def mean_fill(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel mean, broadcast to the image shape."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def scaled_kernel(kernel_size: int, image_size: int, reference_size: int = 224) -> int:
    """A kernel size given at ``reference_size`` scaled to ``image_size``, kept odd and >= 1."""
    scaled = max(1, int(round(kernel_size * image_size / reference_size)))
    return scaled if scaled % 2 == 1 else scaled + 1
