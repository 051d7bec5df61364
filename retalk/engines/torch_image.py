"""The OpenCV image operations of the neural engine's render path in torch, batched over (n, C, H, W) tensors
on any device: affine warps, bilinear resizes, Gaussian blurs, erosion, image pyramids and the Laplacian blend.

Each follows OpenCV's arithmetic closely enough to stand in for it (tests/test_torch_image.py measures how
closely): the same sample positions, kernels and borders, and for uint8 images the same fixed-point rounding,
so a uint8 tensor gives a uint8 result as ``cv2`` does for a uint8 array, a float tensor a float result.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from retalk.errors import InputError

# cv2.resize's uint8 bilinear weights are integers scaled by this
RESIZE_COEF_SCALE = 2048
PYR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # OpenCV's pyramid kernel, unnormalised (sum 16 per direction)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise InputError(f"images must be an (n, C, H, W) tensor; got shape {tuple(images.shape)}")


def _reflect101(index: torch.Tensor, size: int) -> torch.Tensor:
    """OpenCV's BORDER_REFLECT_101 for any index (gfedcb|abcdefgh|gfedcba), however far outside."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def _pad_reflect101(images: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    size = images.shape[dim]
    index = torch.arange(-before, size + after, device=images.device)
    return images.index_select(dim, _reflect101(index, size))


def _correlate(images: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """F.conv2d in the images' own dtype: the networks' bf16/fp16 autocast must not round the image work."""
    with torch.autocast(images.device.type, enabled=False):
        return F.conv2d(images, weight.to(images.dtype), stride=stride)


def _filter_separable(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel correlated with the odd-sized ``kernel`` along x then y, BORDER_REFLECT_101 (float
    images)."""
    n, c, h, w = images.shape
    k = len(kernel)
    flat = images.reshape(n * c, 1, h, w)
    flat = _correlate(_pad_reflect101(flat, k // 2, k // 2, 3), kernel.reshape(1, 1, 1, k))
    flat = _correlate(_pad_reflect101(flat, k // 2, k // 2, 2), kernel.reshape(1, 1, k, 1))
    return flat.reshape(n, c, h, w)


def _round_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """OpenCV's fixed-point casts round halves up."""
    return torch.floor(values + 0.5).clamp(0, 255).to(torch.uint8)


# --- warps and resizes ------------------------------------------------------------------------------------------


def _inverted_affine(matrices: np.ndarray) -> np.ndarray:
    """(n, 2, 3) image -> output maps inverted into output -> image maps, as cv2.warpAffine inverts them."""
    m = matrices.reshape(-1, 6)
    det = m[:, 0] * m[:, 4] - m[:, 1] * m[:, 3]
    d = np.divide(1.0, det, out=np.zeros_like(det), where=det != 0)
    a11, a22, a12, a21 = m[:, 4] * d, m[:, 0] * d, -m[:, 1] * d, -m[:, 3] * d
    b1 = -a11 * m[:, 2] - a12 * m[:, 5]
    b2 = -a21 * m[:, 2] - a22 * m[:, 5]
    return np.stack([a11, a12, b1, a21, a22, b2], axis=1).reshape(-1, 2, 3)


def _warp_positions(matrices: np.ndarray, size: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
    """cv2.warpAffine's source position (x, then y) of each output pixel, (n, H, W) float32: each row's term in
    float64, rounded to float32, plus the column's in one float32 rounding (a fused multiply-add)."""
    inv = torch.from_numpy(_inverted_affine(np.asarray(matrices, np.float64))).to(device)
    width, height = size
    xs = torch.arange(width, dtype=torch.float64, device=device)
    ys = torch.arange(height, dtype=torch.float64, device=device)
    positions = []
    for row in inv.unbind(1):  # (n, 3) each
        per_row = (ys * row[:, 1, None] + row[:, 2, None]).float().double()
        per_column = xs * row[:, 0, None].float().double()
        positions.append((per_row[:, :, None] + per_column[:, None, :]).float())
    return positions


def warp_affine(
    images: torch.Tensor,
    matrices: np.ndarray,
    size: tuple[int, int],
    border_value: float | Sequence[float] = 0,
) -> torch.Tensor:
    """cv2.warpAffine(image, matrix, size) of each image (bilinear, BORDER_CONSTANT ``border_value``, one value
    or one per channel): (n, C, H, W) and (n, 2, 3) image -> output maps -> (n, C, size[1], size[0]).

    As OpenCV 4.11+ does, in float32: positions, then two linear interpolations along x and one along y, uint8
    rounded half to even."""
    _check_images(images)
    n, c, h, w = images.shape
    if np.shape(matrices) != (n, 2, 3):
        raise InputError(f"warp_affine needs one (2, 3) matrix per image; got {np.shape(matrices)} for {n}")
    sx, sy = _warp_positions(matrices, size, images.device)
    x0, y0 = sx.floor(), sy.floor()
    fx, fy = (sx - x0).reshape(n, 1, -1), (sy - y0).reshape(n, 1, -1)
    # a two-pixel ring of the border value: a neighbour outside the image reads it, positions further out
    # are clamped onto it
    border = torch.as_tensor(border_value, dtype=torch.float32, device=images.device).reshape(-1)
    padded = border.expand(c).reshape(1, c, 1, 1).repeat(n, 1, h + 4, w + 4)
    padded[:, :, 2:-2, 2:-2] = images
    flat = padded.reshape(n, c, -1)
    x0 = x0.long().clamp_(-2, w) + 2
    y0 = y0.long().clamp_(-2, h) + 2
    top_left = (y0 * (w + 4) + x0).reshape(n, 1, -1).expand(n, c, -1)

    def pixels(offset: int) -> torch.Tensor:
        return flat.gather(2, top_left + offset)

    p00, p01, p10, p11 = (pixels(offset) for offset in (0, 1, w + 4, w + 5))
    top = p00 + fx * (p01 - p00)
    bottom = p10 + fx * (p11 - p10)
    out = (top + fy * (bottom - top)).reshape(n, c, size[1], size[0])
    if images.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(images.dtype)


def _resize_taps(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cv2.resize's bilinear taps along one axis: the two source indices and the float32 weight of the second
    for each output position (half-pixel centres, clamped at the edges, no antialiasing)."""
    position = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    left = np.floor(position).astype(np.int64)
    frac = position - left
    outside = (left < 0) | (left >= src - 1)
    frac[outside] = 0
    left = left.clip(0, src - 1)
    right = np.minimum(left + 1, src - 1)
    return tuple(torch.from_numpy(x).to(device) for x in (left, right, frac))


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.resize(image, size) of each image (INTER_LINEAR): (n, C, H, W) -> (n, C, size[1], size[0]).

    uint8 images take OpenCV's integers: weights in 1/2048, the rows' sums scaled down as its vector code
    scales them before the vertical pass (its scalar code, for a few pixels, rounds once: one level apart)."""
    _check_images(images)
    n, c, h, w = images.shape
    if size == (w, h):
        return images.clone()
    x0, x1, fx = _resize_taps(w, size[0], images.device)
    y0, y1, fy = _resize_taps(h, size[1], images.device)
    if images.dtype != torch.uint8:
        fx, fy = fx.to(images.dtype), fy.to(images.dtype)
        rows = images.index_select(3, x0) * (1 - fx) + images.index_select(3, x1) * fx
        fy = fy[:, None]
        return rows.index_select(2, y0) * (1 - fy) + rows.index_select(2, y1) * fy
    bx = torch.round(fx * RESIZE_COEF_SCALE).int()
    by = torch.round(fy * RESIZE_COEF_SCALE).int()[:, None]
    src = images.int()
    rows = src.index_select(3, x0) * (RESIZE_COEF_SCALE - bx) + src.index_select(3, x1) * bx
    top = ((rows.index_select(2, y0) >> 4) * (RESIZE_COEF_SCALE - by)) >> 16
    bottom = ((rows.index_select(2, y1) >> 4) * by) >> 16
    return ((top + bottom + 2) >> 2).clamp(0, 255).to(torch.uint8)


# --- filters ------------------------------------------------------------------------------------------------------


def gaussian_blur(images: torch.Tensor, ksize: int, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur(image, (ksize, ksize), sigma) of float images (BORDER_REFLECT_101); ``ksize`` 0 takes
    OpenCV's size for ``sigma``, ``sigma`` 0 OpenCV's sigma for ``ksize``."""
    _check_images(images)
    if not images.is_floating_point():
        raise InputError(f"gaussian_blur takes float images; got {images.dtype}")
    if ksize == 0:
        ksize = int(np.rint(sigma * 4 * 2 + 1)) | 1  # OpenCV's size for float images
    kernel = torch.from_numpy(cv2.getGaussianKernel(ksize, sigma).ravel()).to(images.device)
    return _filter_separable(images, kernel)


def erode(images: torch.Tensor, ksize: tuple[int, int]) -> torch.Tensor:
    """cv2.erode(image, np.ones(ksize[::-1])): the minimum over a (width, height) rectangle anchored at its
    centre; pixels outside the image do not count (OpenCV's default border for erosion)."""
    _check_images(images)
    out = -images.float() if images.dtype == torch.uint8 else -images
    for dim, k in ((3, ksize[0]), (2, ksize[1])):
        before = k // 2
        pad = [0, 0, 0, 0]
        pad[2 * (3 - dim)], pad[2 * (3 - dim) + 1] = before, k - 1 - before
        window = (1, k) if dim == 3 else (k, 1)
        out = F.max_pool2d(F.pad(out, pad, value=-torch.inf), window, stride=1)
    return (-out).to(images.dtype)


def pyr_down(images: torch.Tensor) -> torch.Tensor:
    """cv2.pyrDown: the 5-tap kernel (1 4 6 4 1) / 16 in each direction (BORDER_REFLECT_101), every second
    pixel kept: (n, C, H, W) -> (n, C, (H + 1) // 2, (W + 1) // 2); uint8 rounds as OpenCV's integers do."""
    _check_images(images)
    n, c, h, w = images.shape
    exact = images.dtype == torch.uint8
    flat = (images.float() if exact else images).reshape(n * c, 1, h, w)
    taps = torch.tensor(PYR_TAPS, dtype=flat.dtype, device=images.device)
    flat = _correlate(_pad_reflect101(flat, 2, 2, 3), taps.reshape(1, 1, 1, 5), stride=(1, 2))
    flat = _correlate(_pad_reflect101(flat, 2, 2, 2), taps.reshape(1, 1, 5, 1), stride=(2, 1))
    out = flat.reshape(n, c, (h + 1) // 2, (w + 1) // 2)
    return _round_to_uint8(out / 256) if exact else out / 256


def _up_along(images: torch.Tensor, dim: int) -> torch.Tensor:
    """Twice the size along ``dim``, unnormalised (x8): even outputs 1 6 1 around their pixel, odd ones 4 4
    between two; the border before reflects (101), the one after repeats the last pixel, as cv2.pyrUp does."""
    size = images.shape[dim]
    index = torch.arange(-1, size + 1, device=images.device)
    index = torch.where(index < 0, _reflect101(index, size), index.clamp(max=size - 1))
    padded = images.index_select(dim, index)
    before, centre, after = (padded.narrow(dim, k, size) for k in range(3))
    even = before + 6 * centre + after
    odd = 4 * (centre + after)
    shape = list(images.shape)
    shape[dim] *= 2
    return torch.stack([even, odd], dim=dim + 1).reshape(shape)


def pyr_up(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.pyrUp(image, dstsize=size) of float images whose ``size`` (w, h) is twice theirs, or one less (an odd
    finer level): (n, C, H, W) -> (n, C, size[1], size[0])."""
    _check_images(images)
    h, w = images.shape[2:]
    if not images.is_floating_point():
        raise InputError(f"pyr_up takes float images; got {images.dtype}")
    if not (2 * w - 1 <= size[0] <= 2 * w and 2 * h - 1 <= size[1] <= 2 * h):
        raise InputError(f"pyr_up of a {w}x{h} image makes {2 * w}x{2 * h} (or one less); asked {size}")
    out = _up_along(_up_along(images, 3), 2) / 64
    return out[:, :, : size[1], : size[0]]


def laplacian_pyramid_blend(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, num_levels: int
) -> torch.Tensor:
    """retalk.blend.laplacian_pyramid_blend on tensors: ``a`` (n, C, H, W) where ``mask`` (n, 1, H, W) float is
    1, ``b`` where it is 0, band by band; float32, not clipped. The image pyramids keep their input dtype
    (uint8 levels rounded by pyr_down) as the reference's do."""
    if a.shape != b.shape or a.dim() != 4 or mask.shape != (a.shape[0], 1, *a.shape[2:]):
        raise InputError(
            f"blend inputs must be two (n, C, H, W) images and an (n, 1, H, W) mask; got "
            f"{tuple(a.shape)}, {tuple(b.shape)}, {tuple(mask.shape)}"
        )
    if num_levels < 1 or min(a.shape[2:]) >> (num_levels - 1) < 1:
        raise InputError(f"{num_levels} pyramid levels do not fit a {a.shape[3]}x{a.shape[2]} image")
    level_a, level_b, level_m = a, b, mask.float()
    pyr_a, pyr_b, pyr_m = [level_a.float()], [level_b.float()], [level_m]
    for _ in range(num_levels - 1):
        level_a, level_b, level_m = pyr_down(level_a), pyr_down(level_b), pyr_down(level_m)
        pyr_a.append(level_a.float())
        pyr_b.append(level_b.float())
        pyr_m.append(level_m)

    def size(level: torch.Tensor) -> tuple[int, int]:
        return level.shape[3], level.shape[2]

    def mix(k: int, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return la * pyr_m[k] + lb * (1.0 - pyr_m[k])

    top = num_levels - 1
    out = mix(top, pyr_a[top], pyr_b[top])
    for k in range(top - 1, -1, -1):
        out = pyr_up(out, size(pyr_a[k]))
        band_a = pyr_a[k] - pyr_up(pyr_a[k + 1], size(pyr_a[k]))
        band_b = pyr_b[k] - pyr_up(pyr_b[k + 1], size(pyr_b[k]))
        out = out + mix(k, band_a, band_b)
    return out
