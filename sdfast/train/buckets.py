"""Aspect-ratio buckets as in kohya's sd-scripts (`library/model_util.make_bucket_resolutions`,
`train_util.BucketManager`), and the resize + centre crop that puts an image into one.

The buckets of a resolution `W x H`: every `(w, h)` with sides in steps of `step` between
`min_size` and `max_size` where, for each width `w`, `h` is the largest step multiple with
`w * h <= W * H` (and its transpose), plus the square of side `floor(sqrt(W * H) / step) * step`.
An image goes to the bucket whose aspect ratio `w / h` is nearest its own; it is scaled (keeping
its aspect ratio) until it covers the bucket, then centre-cropped to it.
"""
from __future__ import annotations

import math

from PIL import Image


def make_buckets(resolution, min_size, max_size, step):
    """Sorted `(width, height)` buckets for `resolution` `(W, H)` (see module docstring)."""
    width, height = resolution
    max_area = width * height
    side = int(math.isqrt(max_area)) // step * step
    buckets = {(side, side)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, max_area // w // step * step)
        if h >= min_size:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def nearest_bucket(size, buckets):
    """The bucket whose aspect ratio is nearest that of `size` `(w, h)` (first one on ties)."""
    aspect = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def fit_to_bucket(image: Image.Image, bucket) -> Image.Image:
    """Scale `image` (aspect kept) until it covers `bucket` `(w, h)`, then centre-crop to it."""
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize((rw, rh), resample)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))


__all__ = ["make_buckets", "nearest_bucket", "fit_to_bucket"]
