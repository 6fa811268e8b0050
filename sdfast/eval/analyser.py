"""A deterministic analyser for shapes-dataset images, and prompt-following scores.

`analyse(image)` reads back the five attributes of `sdfast.data.shapes` from a picture, with
plain numpy (no learned model), so generated images can be scored against their prompts:

1. Bring the image to 64x64 RGB (the dataset's resolution; every threshold below is in its pixels).
2. Background: the per-channel median of the 2-pixel border (a large shape in a corner covers at
   most ~15% of the border, so the median is the background's).
3. Rough shape: on a 3x3 box-smoothed copy (noise / 3), the distance to the background colour.
   The shape's contrast is that distance's 99.7th percentile (the top ~12 pixels; the smallest
   shape covers ~45); the largest 8-connected component past half of it is the rough shape.
4. Colours: the shape's is the median of the rough shape's interior (eroded by one pixel, away
   from blended edges), the background's the median of the border pixels outside it; each is
   named by the nearest palette colour.
   Final shape: each pixel's coverage is its ([1, 2, 1]-smoothed) colour projected on the
   background -> shape colour axis (0 = background, 1 = shape; projecting onto one axis also
   drops two thirds of the noise). The largest component past 0.5 coverage is the shape: the
   50% contour of an anti-aliased or mildly blurred edge, where the dataset's pixel centres
   switch from background to shape.
5. Position: the 3x3 cell holding the component's centroid (cells split the image in thirds).
6. Size: the longer bounding-box side against the midpoint of the jittered small and large extents.
7. Shape: inside its bounding box, a triangle (apex up) has far less area in its top half than
   in its bottom half; otherwise the intersection-over-union with an inscribed circle or square
   decides (a fill-ratio test that also uses where the pixels are).

Fields it cannot read come back None: all but the background for an image with no shape
(contrast below half the palette's smallest colour distance, or a component under 12 px), and
the shape when the chosen template fits badly (IoU below 0.5).

`score(prompts, images)` compares analyses with what each prompt asked for. `parse_caption`
turns a caption into the partial spec of the attributes it names, so an attribute a prompt
leaves out is not scored.
"""
from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.shapes import (BACKGROUND_WORDS, CENTER_WORDS, COLORS, COLS, EXTENTS, IMAGE_SIZE,
                           PALETTE, ROW_WORDS, ROWS, SHAPES, SIZE_JITTER, SIZE_WORDS, ShapeSpec)
from ..errors import SdfastError

ATTRIBUTES = ("color", "shape", "position", "size", "background")
BORDER = 2                            # px of image edge that estimate the background
CONTRAST_PERCENTILE = 99.7            # top ~12 of 4096 pixels: inside even the smallest shape
_PALETTE = np.array([PALETTE[c] for c in COLORS], np.float64)                     # [8, 3]
# Half the smallest distance between two palette colours: a "shape" closer than this to the
# background is noise, not something the dataset draws.
MIN_CONTRAST = 0.5 * min(np.linalg.norm(a - b) for a, b in itertools.combinations(_PALETTE, 2))
MIN_AREA = 12                         # px; the smallest drawn shape (small triangle) has ~45
MIN_SHAPE_IOU = 0.5                   # below this the chosen template does not fit: unknown
TAPER_MAX = 0.7                       # top-half / bottom-half area below this: a triangle
# Longest bbox side separating small from large: midway between the largest small extent and
# the smallest large one after size jitter (11 * 1.08 = 11.9 and 18 * 0.92 = 16.6 -> 14.2).
SIZE_THRESHOLD = 0.5 * (EXTENTS["small"] * (1 + SIZE_JITTER) + EXTENTS["large"] * (1 - SIZE_JITTER))
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclass(frozen=True)
class Analysis:
    """What `analyse` read from an image: canonical attribute names, None where unreadable."""

    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    background: str | None = None

    def as_spec(self) -> ShapeSpec:
        """The same attributes as a (possibly partial) `ShapeSpec`."""
        return ShapeSpec(**asdict(self))


# ------------------------------------------------------------------------------------ analyse
def analyse(image) -> Analysis:
    """Read colour, shape, position, size and background from one image.

    `image`: a PIL image, a path, or an array `[H, W]`, `[H, W, 3|4]` or `[3|4, H, W]` (uint8,
    or float in 0..1). Any size: it is resized to 64x64 first. Never raises on image content:
    an empty, flat or garbage image gives None fields.
    """
    rgb = _to_rgb64(image)
    if rgb is None:
        return Analysis()
    found = _segment(rgb)
    if isinstance(found, str):                                   # no shape: background only
        return Analysis(background=found)
    mask, fg, bg = found
    ys, xs = np.nonzero(mask)
    return Analysis(color=_nearest_color(fg),
                    shape=_classify_shape(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]),
                    position=_position(ys.mean() + 0.5, xs.mean() + 0.5),
                    size=_size(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1),
                    background=_nearest_color(bg))


def _segment(rgb: np.ndarray):
    """`(mask, fg, bg)` of the shape, or the background colour name when there is none.

    Pass 1 finds the shape on a box-smoothed copy and measures its colour; pass 2 estimates each
    pixel's coverage as its projection onto the background -> foreground colour axis and keeps
    the largest component past 0.5 coverage (the edge where the dataset's pixel centres switch).
    """
    smooth = _box3(rgb)
    bg = np.median(_border(smooth), axis=0)
    dist = np.linalg.norm(smooth - bg, axis=-1)                        # [64, 64]
    contrast = np.percentile(dist, CONTRAST_PERCENTILE)
    if not contrast >= MIN_CONTRAST:                                    # also catches NaN
        return _nearest_color(bg)
    rough = _largest_component(dist > 0.5 * contrast)
    if rough.sum() < MIN_AREA:
        return _nearest_color(bg)
    outside = _border(~_dilate(rough))
    if outside.any():
        bg = np.median(_border(rgb)[outside], axis=0)
    interior = _erode(rough)
    fg = np.median(rgb[interior] if interior.any() else rgb[rough], axis=0)
    axis = fg - bg
    if not np.linalg.norm(axis) >= MIN_CONTRAST:
        return _nearest_color(bg)
    alpha = (_smooth121(rgb) - bg) @ axis / (axis @ axis)                # [64, 64, 3] -> [64, 64]
    mask = _largest_component(alpha > 0.5)
    if mask.sum() < MIN_AREA:
        return _nearest_color(bg)
    return mask, fg, bg


def _to_rgb64(image) -> np.ndarray | None:
    """Any supported image -> float64 `[64, 64, 3]` in 0..255, or None for an empty one."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise SdfastError(f"{image}: not a readable image ({exc})") from None
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            return None
        image = np.asarray(image.convert("RGB"))
    array = _as_hwc(np.asarray(image))
    if array is None:
        return None
    if array.dtype.kind == "f":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        array = np.clip(array * 255.0 if array.max(initial=0.0) <= 1.0 else array, 0, 255)
    array = np.clip(array, 0, 255).astype(np.uint8)
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        smaller = array.shape[0] < IMAGE_SIZE or array.shape[1] < IMAGE_SIZE
        method = Image.Resampling.BILINEAR if smaller else Image.Resampling.BOX
        array = np.asarray(Image.fromarray(array, "RGB").resize((IMAGE_SIZE, IMAGE_SIZE), method))
    return array.astype(np.float64)


def _as_hwc(array: np.ndarray) -> np.ndarray | None:
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` (C in 1, 3, 4) -> `[H, W, 3]`; None if not an image."""
    if array.dtype.kind not in "biuf":
        raise SdfastError(f"cannot analyse an array of dtype {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)                                 # [C, H, W] -> [H, W, C]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise SdfastError(f"expected an image array [H, W(, C)], got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        return None
    if array.dtype.kind == "b":
        array = array.astype(np.uint8) * 255
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]


def _box3(rgb: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication, `[H, W, C]` -> `[H, W, C]`."""
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = rgb.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _smooth121(rgb: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing with edge replication: lighter than `_box3`."""
    p = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _border(array: np.ndarray) -> np.ndarray:
    """The pixels within BORDER of the edge, `[H, W, ...]` -> `[N, ...]`."""
    ring = np.ones(array.shape[:2], bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    return array[ring]


def _nearest_color(rgb) -> str | None:
    rgb = np.asarray(rgb, np.float64)
    if not np.isfinite(rgb).all():
        return None
    return COLORS[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (breadth-first flood fill)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, members = deque([start]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(members) > len(best):
            best = members
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _shifted(mask: np.ndarray, fill: bool) -> list[np.ndarray]:
    """The mask moved one pixel up, down, left and right (`fill` outside the image)."""
    p = np.pad(mask, 1, constant_values=fill)
    return [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose 4 neighbours are all in it."""
    out = mask.copy()
    for s in _shifted(mask, False):
        out &= s
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """`mask` grown by one pixel (4-neighbourhood)."""
    out = mask.copy()
    for s in _shifted(mask, False):
        out |= s
    return out


def _position(cy: float, cx: float) -> str:
    """Canonical cell name of a centroid (pixel units of the 64x64 image)."""
    third = IMAGE_SIZE / 3
    row = ROWS[min(max(int(cy // third), 0), 2)]
    col = COLS[min(max(int(cx // third), 0), 2)]
    return f"{row} {col}"


def _size(height: int, width: int) -> str:
    return "large" if max(height, width) > SIZE_THRESHOLD else "small"


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes inscribed in an `h x w` box, sampled at pixel centres."""
    y = ((np.arange(h) + 0.5) / h)[:, None]                          # 0..1 down the box
    x = ((np.arange(w) + 0.5) / w)[None, :]                          # 0..1 across it
    return {"circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
            "square": np.ones((h, w), bool),
            "triangle": np.abs(x - 0.5) <= y / 2}                  # apex top centre, base bottom


def _classify_shape(box_mask: np.ndarray) -> str | None:
    """circle / square / triangle from the component cropped to its bounding box.

    Taper first: the top half of an apex-up triangle holds 1/3 of the bottom half's area, a
    circle or square as much as the bottom (blur rounds the apex, which moves a triangle toward
    0.6; TAPER_MAX sits between). Then circle vs square by IoU with the inscribed template.
    None when the chosen template overlaps the component by less than MIN_SHAPE_IOU.
    """
    h, w = box_mask.shape
    taper = box_mask[: h // 2].sum() / max(box_mask[(h + 1) // 2:].sum(), 1)
    templates = _templates(h, w)
    iou = {name: (box_mask & t).sum() / (box_mask | t).sum() for name, t in templates.items()}
    if taper < TAPER_MAX:
        best = "triangle"
    else:
        best = "square" if iou["square"] > iou["circle"] else "circle"
    return best if iou[best] >= MIN_SHAPE_IOU else None


# ------------------------------------------------------------------------- captions and scores
def parse_caption(text: str) -> ShapeSpec:
    """The partial `ShapeSpec` of the attributes a caption names (None for the rest).

    Understands the dataset's phrasings and their synonyms: "big"/"little", "upper"/"lower",
    "centre"/"middle", "top-left", "on the right", "in the middle", and a background named as
    "<colour> background" (or "background of <colour>"). The shape colour is the first colour
    word that does not name the background.
    """
    words = re.findall(r"[a-z]+", str(text).lower())
    bg_index = _background_index(words)
    background = words[bg_index] if bg_index is not None else None
    color = next((w for i, w in enumerate(words) if w in COLORS and i != bg_index), None)
    shape = next((w for w in words if w in SHAPES), None)
    size = next((name for w in words for name, syn in SIZE_WORDS.items() if w in syn), None)
    return ShapeSpec(shape=shape, color=color, position=_parse_position(words), size=size,
                     background=background)


def _background_index(words: list[str]) -> int | None:
    """Index of the colour word naming the background, if the caption names one."""
    for i, word in enumerate(words):
        if word not in BACKGROUND_WORDS:
            continue
        if i > 0 and words[i - 1] in COLORS:
            return i - 1
        j = i + 1 + (i + 1 < len(words) and words[i + 1] in ("of", "is"))
        if j < len(words) and words[j] in COLORS:
            return j
    return None


def _parse_position(words: list[str]) -> str | None:
    """Cell named by position words: a row word, a side, or a centre word (module tables)."""
    row = next((name for w in words for name, syn in ROW_WORDS.items() if w in syn), None)
    col = next((w for w in words if w in ("left", "right")), None)
    if row is None and col is None:
        return "middle center" if any(w in CENTER_WORDS for w in words) else None
    return f"{row or 'middle'} {col or 'center'}"


def _target(item) -> ShapeSpec:
    if isinstance(item, ShapeSpec):
        return item
    if isinstance(item, str):
        return parse_caption(item)
    if isinstance(item, Mapping):
        return ShapeSpec(**{f.name: item.get(f.name) for f in fields(ShapeSpec)})
    raise SdfastError(f"expected a ShapeSpec, caption or spec dict, got {type(item).__name__}")


def score(specs_or_prompts, images) -> dict:
    """Prompt-following accuracy of `images` against what each prompt asked for.

    `specs_or_prompts`: per image a `ShapeSpec` (None fields not scored), a caption (parsed with
    `parse_caption`) or a dict with spec keys (a metadata.jsonl row). `images`: anything
    `analyse` takes, or ready `Analysis` objects. Returns `{attribute: accuracy}` for the five
    attributes (None where no prompt named it), `"all"`: the fraction of images right on every
    attribute their prompt named, `"n"`: the number of images, and `"counts"`: how many prompts
    named each attribute.
    """
    targets = [_target(t) for t in specs_or_prompts]
    images = list(images)
    if len(targets) != len(images):
        raise SdfastError(f"{len(targets)} prompts but {len(images)} images")
    counts = dict.fromkeys(ATTRIBUTES, 0)
    correct = dict.fromkeys(ATTRIBUTES, 0)
    all_right = 0
    for target, image in zip(targets, images):
        found = image if isinstance(image, Analysis) else analyse(image)
        ok = True
        for name in ATTRIBUTES:
            wanted = getattr(target, name)
            if wanted is None:
                continue
            counts[name] += 1
            hit = getattr(found, name) == wanted
            correct[name] += hit
            ok &= hit
        all_right += ok
    result = {name: (correct[name] / counts[name] if counts[name] else None) for name in ATTRIBUTES}
    result.update(all=all_right / len(targets) if targets else None, n=len(targets), counts=counts)
    return result
