"""Step-Video-TI2V's first image: load, resize + centre crop to the video size, condition latent.

    image = load_image("cat.png")                          # (3, H, W) float32 in [-1, 1]
    frame = resize_and_crop(image, height, width)          # (3, height, width), what the VAE encodes
    cond = condition_latents(image_latent, batch, frames)  # (batch, frames, c, h, w): latent frame 0 = image

The resize is torchvision's `Resize((h, w))` on a float tensor, i.e. bilinear
interpolation with antialiasing (`interpolate(mode="bilinear", antialias=True,
align_corners=False)`): each output pixel is a triangle-filter average whose
support widens by the scale factor when shrinking. It is computed here as two
small weight matrices (columns, then rows, in torch's order) in float32.

The scale is the original's: the image is scaled so that it covers the target
(by the width if it is relatively taller than the video, else by the height),
each side rounded with Python's `round`, then centre-cropped.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

ImageInput = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]


def load_image(image: ImageInput) -> np.ndarray:
    """A path, a PIL image or an array -> (3, H, W) float32 in [-1, 1].

    Paths and PIL images are converted to RGB and scaled as torchvision's ToTensor then x*2-1.
    Arrays: float (3, H, W) already in [-1, 1] (the original's tensor input), or uint8 (H, W, 3) RGB pixels.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"first_image: no image file at {os.fspath(image)!r}")
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return _pixels_to_unit(pixels)
    if hasattr(image, "asnumpy"):  # a MindSpore Tensor
        image = image.asnumpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"first_image: expected a path, a PIL image or an array, got {type(image).__name__}")
    if image.dtype == np.uint8:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"first_image: a uint8 array must be RGB pixels (H, W, 3), got shape {image.shape}")
        return _pixels_to_unit(image)
    if not np.issubdtype(image.dtype, np.floating) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"first_image: a float array must be (3, H, W) in [-1, 1], got {image.dtype} "
                         f"of shape {image.shape}")
    if min(image.shape[1:]) < 1 or not np.isfinite(image).all():
        raise ValueError(f"first_image: expected a non-empty image of finite values, got shape {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _pixels_to_unit(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: ToTensor (/255) then *2 - 1, in float32 as torch does."""
    unit = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return unit * np.float32(2) - np.float32(1)


def cover_size(image_hw: tuple, height: int, width: int) -> tuple:
    """(h, w) the image is resized to before the centre crop: the smallest size covering (height, width)."""
    h, w = image_hw
    if w / h < width / height:  # relatively taller than the video: fit the width
        scale = width / w
    else:
        scale = height / h
    return int(round(h * scale)), int(round(w * scale))


def _aa_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of torch's antialiased bilinear interpolation along one axis.

    scale = in/out; the triangle filter's support is max(scale, 1); output pixel i is centred at
    scale*(i+0.5) in input coordinates; each row is normalised to sum to 1.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    support = scale if scale >= 1 else np.float32(1)
    inv = np.float32(1) / scale if scale >= 1 else np.float32(1)
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)  # int() truncates toward zero, as C++ casts
        hi = min(int(center + support + np.float32(0.5)), in_size)
        j = np.arange(lo, hi)
        w = np.maximum(np.float32(0), np.float32(1) - np.abs((j - center + np.float32(0.5)) * inv)).astype(np.float32)
        total = w.sum(dtype=np.float32)
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


def resize_bilinear_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(c, H, W) -> (c, height, width) float32, antialiased bilinear (torchvision Resize on a float tensor)."""
    c, h, w = image.shape
    out = image.astype(np.float32, copy=False)
    if w != width:  # columns first, as torch does
        out = np.einsum("chw,ow->cho", out, _aa_bilinear_weights(w, width), dtype=np.float32)
    if h != height:
        out = np.einsum("chw,oh->cow", out, _aa_bilinear_weights(h, height), dtype=np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


def resize_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(3, H, W) -> (3, height, width): resize to cover the target keeping the aspect ratio, then centre crop."""
    scaled_h, scaled_w = cover_size(image.shape[1:], height, width)
    resized = resize_bilinear_aa(image, scaled_h, scaled_w)
    top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
    return np.ascontiguousarray(resized[:, top:top + height, left:left + width])


def condition_latents(image_latent: np.ndarray, batch: int, latent_frames: int) -> np.ndarray:
    """(1, 1, c, h, w) image latent -> (batch, latent_frames, c, h, w): frame 0 the image, zeros after."""
    if image_latent.ndim != 5 or image_latent.shape[:2] != (1, 1):
        raise ValueError(f"image latent: expected shape (1, 1, c, h, w) (one image, one latent frame), "
                         f"got {image_latent.shape}")
    _, _, c, h, w = image_latent.shape
    out = np.zeros((batch, latent_frames, c, h, w), np.float32)
    out[:, 0] = image_latent[0, 0]
    return out
