"""Converting user images and masks to tensors, and tensors to the requested output."""
import os

import numpy as np
import torch
from PIL import Image

from .errors import SdfastError


def _unreadable(path, exc):
    """The one-line SdfastError for an image file Pillow cannot read."""
    path = os.fsdecode(path)
    if os.path.isdir(path):
        return SdfastError(f"{path}: is a folder, not an image")
    if isinstance(exc, Image.UnidentifiedImageError):
        reason = "not an image format Pillow reads"
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SdfastError(f"{path}: not a readable image ({reason})")


def open_image(path, mode):
    """The image file `path`, decoded and converted to `mode` (None: only decoded);
    SdfastError (one line naming the file) when it is missing, a folder, or not an image Pillow
    can decode."""
    try:
        with Image.open(path) as img:
            if mode is None:
                img.load()
                return None
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def check_image_file(path):
    """Decode the image file `path` once, before any model loads (see `open_image`)."""
    open_image(path, None)


def _to_pil(image, mode):
    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return open_image(image, mode)
    if isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(array).convert(mode)
    return None


def _tensor_image(image, channels, width, height):
    t = image.detach().float().cpu()
    if t.dim() == 3:
        t = t.unsqueeze(0)                                         # [C, H, W] -> [1, C, H, W]
    if t.dim() != 4 or t.shape[1] not in (1, channels):
        raise SdfastError(f"expected an image tensor [B, {channels}, H, W], got {list(t.shape)}")
    if t.shape[1] != channels:
        t = t.expand(-1, channels, -1, -1)
    if tuple(t.shape[2:]) != (height, width):
        t = torch.nn.functional.interpolate(t, size=(height, width), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
    return t


def _prepare(image, mode, width, height):
    """Any supported image -> `[B, C, height, width]` float32 in 0..1."""
    channels = 3 if mode == "RGB" else 1
    if isinstance(image, torch.Tensor):
        return _tensor_image(image, channels, width, height)
    pil = _to_pil(image, mode)
    if pil is None:
        raise SdfastError(f"unsupported image type {type(image).__name__}; use a PIL image, "
                          "a path, a numpy array or a tensor")
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.LANCZOS)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    t = torch.from_numpy(array.copy())
    return t.permute(2, 0, 1)[None] if t.dim() == 3 else t[None, None]


def prepare_image(image, width, height):
    """An init image -> `[B, 3, H, W]` in [-1, 1] at the output size."""
    return _prepare(image, "RGB", width, height) * 2.0 - 1.0


def prepare_mask(mask, width, height):
    """A mask -> `[1, 1, H, W]` in 0..1; white (1) is repainted, black (0) is kept."""
    return _prepare(mask, "L", width, height)[:1, :1]


def to_output(images, output):
    """`[B, 3, H, W]` in 0..1 -> a list of PIL images or the tensor itself."""
    if output == "tensor":
        return images.cpu()
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
