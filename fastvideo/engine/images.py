"""Conditioning images from what users pass (a path, a PIL image, an array) to the one
form the wire carries: a uint8 [H, W, 3] RGB tensor, validated at the API boundary."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch

from fastvideo.wire.spec import ModelSpec
from fastvideo.wire.validation import DefaultSize, size_for_image


def load_image(image: Any) -> torch.Tensor:
    """uint8 [H, W, 3] RGB from a file path, an encoded file's bytes (PNG, JPEG, ...), a PIL
    image, or a uint8 HWC array/tensor (grey and RGBA are converted); TypeError/ValueError
    naming ``image`` otherwise."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(image)
    elif isinstance(image, (bytes, bytearray)):
        image = _open(io.BytesIO(image), "the given bytes")
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a file path, a PIL image or a uint8 [H, W, 3] array, got "
            f"{type(image).__name__}"
        )
    if image.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image array must be [H, W, 3] (RGB), got shape {image.shape}")
    # A writable C-contiguous copy where needed (PIL arrays are read-only).
    return torch.from_numpy(np.require(image[:, :, :3], requirements=["C", "W"]))


def request_size(
    spec: ModelSpec, image: torch.Tensor | None, height: Any, width: Any
) -> tuple[Any, Any]:
    """The (height, width) a request runs at.

    Sizes the caller set are kept as given (and validated later). When an image is given
    and both sides are still the model's defaults (``DefaultSize``, as image-to-video
    variants give them), the size follows the image: its aspect ratio at the area of the
    default size, each side rounded to the model's pixel multiple (diffusers' examples'
    rule, ``wire.validation.size_for_image``). Otherwise the defaults apply as they are.
    """
    if image is None or not (isinstance(height, DefaultSize) and isinstance(width, DefaultSize)):
        return height, width
    image_height, image_width = int(image.shape[0]), int(image.shape[1])
    return size_for_image(image_height, image_width, height * width, spec.pixel_multiple)


def _open(source: str | os.PathLike | io.BytesIO, name: str | None = None) -> Any:
    """A PIL image read from a path (or from ``source`` bytes, called ``name``)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise ValueError("image: reading image files needs Pillow (pip install pillow)") from None
    what = name or repr(os.fspath(source))  # type: ignore[arg-type]
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise ValueError(f"image: no such file {what}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image: cannot read {what} as an image ({e})") from None
