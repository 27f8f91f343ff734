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

STRATEGIES = ("hp", "blur", "mean")


def noise_fill(shape: torch.Size | tuple[int, ...], std: float, channelwise: torch.Tensor,
               generator: torch.Generator | None = None, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, C, H, W) zero-mean Gaussian noise; rows where ``channelwise`` is False repeat channel 0."""
    # normal_(0, std) draws exactly what randn(...) * std does, in one pass instead of two.
    noise = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)
    channelwise = channelwise.to(noise.device, torch.bool)
    if noise.shape[1] == 1:
        return noise
    if noise.device.type == "cpu":  # copy channel 0 into the spatial rows only: a fraction of a full pass
        spatial = torch.nonzero(~channelwise).flatten()
        noise[spatial, 1:] = noise[spatial, :1]
        return noise
    return torch.where(channelwise[:, None, None, None], noise, noise[:, :1])  # no host sync on a GPU


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def same_memory_format(result: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``result`` in ``reference``'s memory format: channels_last inputs (CUDA training) stay channels_last
    through the filter and the masking, so the encoder's convolutions get the layout they run fastest on."""
    if reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last) \
            and not reference.is_contiguous():
        return result.contiguous(memory_format=torch.channels_last)
    return result


def blur_matrix(size: int, kernel_size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(size, size) matrix ``M`` with ``M @ v`` = the 1-D Gaussian blur of ``v`` with reflect padding
    (replicate padding when the image is too small to reflect ``kernel_size // 2`` pixels)."""
    kernel = gaussian_kernel1d(kernel_size, sigma, device, dtype)
    pad = kernel_size // 2
    rows = torch.arange(size, device=device)[:, None].expand(size, kernel_size)
    source = rows + torch.arange(kernel_size, device=device)[None, :] - pad
    if pad < size:  # reflect without repeating the edge: -1 -> 1, size -> size - 2
        source = source.abs()
        source = torch.where(source >= size, 2 * (size - 1) - source, source)
    else:
        source = source.clamp(0, size - 1)
    matrix = torch.zeros(size, size, device=device, dtype=dtype)
    return matrix.index_put_((rows, source), kernel.expand(size, kernel_size), accumulate=True)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (the same result as torchvision's ``gaussian_blur``,
    which convolves with the full 2-D kernel), as two matrix products ``M_h @ x @ M_w^T``.

    A 1-channel convolution takes a slow path on the CPU (im2col): the banded matrices, padding folded in,
    run as dense GEMMs 5-20x faster at 64-224 px. Autocast is off inside, so the filter keeps the input's
    precision under AMP (a high-pass is a small difference of large values)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1:
        return images
    height, width = images.shape[-2:]
    dtype = images.dtype if images.is_floating_point() else torch.float32
    with torch.autocast(images.device.type, enabled=False):
        rows = blur_matrix(height, kernel_size, sigma, images.device, dtype)
        cols = blur_matrix(width, kernel_size, sigma, images.device, dtype)
        return same_memory_format(torch.matmul(rows, torch.matmul(images.to(dtype), cols.T)), images)


def blur_fill(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    return gaussian_blur(images, kernel_size, sigma)


def mean_fill(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel mean, broadcast to the image shape."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)


def scaled_kernel(kernel_size: int, image_size: int, reference_size: int = 224) -> int:
    """A kernel size given at ``reference_size`` scaled to ``image_size``, kept odd and >= 1."""
    scaled = max(1, int(round(kernel_size * image_size / reference_size)))
    return scaled if scaled % 2 == 1 else scaled + 1
