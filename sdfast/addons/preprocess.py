"""Control-image preprocessors that need no model download (numpy only).

- `canny(image, low=100, high=200)`: edges as A1111's ControlNet "canny" preprocessor makes them
  (OpenCV's `cv2.Canny(image, low, high)` semantics: 3x3 Sobel on the grey image, L1 gradient
  magnitude, non-maximum suppression in four directions, hysteresis with 8-connectivity),
  white edges on black.
- `binary(image, threshold=127)`: a scribble / mask map, white where the grey level is above
  `threshold` (A1111's "binary" / scribble_xdog-free threshold), black elsewhere.

Both take a path, a PIL image or an HxWx3 uint8 array and return an RGB PIL image of the same size.
"""
import numpy as np
from PIL import Image

PREPROCESSORS = ("canny", "binary")


def _grey(image):
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from sdfast.images import open_image

        image = open_image(image, "RGB")            # SdfastError naming an unreadable file
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.ndim == 2:
        return rgb
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114    # [H, W]


def _as_image(mask):
    return Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))


def _sobel(grey):
    p = np.pad(grey, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _neighbours(a, dy, dx):
    """`a` shifted so that out[y, x] = a[y + dy, x + dx] (zero outside)."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[yd, xd] = a[ys, xs]
    return out


def canny(image, low=100, high=200):
    """White-on-black edge map (module docstring)."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got {low}, {high}")
    gx, gy = _sobel(_grey(image))
    mag = np.abs(gx) + np.abs(gy)
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    # direction bins: 0 (horizontal gradient), 45, 90, 135 degrees; compare along the gradient
    bins = ((angle + 22.5) // 45).astype(int) % 4
    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = np.zeros(mag.shape, dtype=bool)
    for b, (dy, dx) in steps.items():
        fwd, back = _neighbours(mag, dy, dx), _neighbours(mag, -dy, -dx)
        keep |= (bins == b) & (mag > fwd) & (mag >= back)
    strong = keep & (mag > high)
    weak = keep & (mag > low)
    while True:                                   # hysteresis: grow strong edges through weak
        grown = strong.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    grown |= _neighbours(strong, dy, dx) & weak
        if (grown == strong).all():
            break
        strong = grown
    return _as_image(strong)


def binary(image, threshold=127):
    """White where the grey level exceeds `threshold`, else black."""
    return _as_image(_grey(image) > threshold)


def preprocess(name, image):
    """Run the preprocessor `name` ("canny" or "binary") with its defaults."""
    if name not in PREPROCESSORS:
        from sdfast.errors import SdfastError

        raise SdfastError(f"unknown preprocessor {name!r}; built in: {', '.join(PREPROCESSORS)}")
    return canny(image) if name == "canny" else binary(image)


__all__ = ["canny", "binary", "preprocess", "PREPROCESSORS"]
