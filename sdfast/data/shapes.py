"""The procedural "shapes" dataset: one shape on a plain background, and its caption.

Every image is 64x64 RGB and shows ONE shape (circle, square or triangle) in one of eight palette
colours, in one cell of a 3x3 grid (top/middle/bottom x left/center/right), small or large, on a
background of another palette colour. The background uses the same eight colours as the shapes
(any one but the shape's own), so a model learns each colour word once and has to bind it to the
right noun ("a red circle on a blue background" vs "a blue circle on a red background").

Geometry, in pixel units of the 64x64 image (x right, y down; pixel (i, j) covers
[j, j+1) x [i, i+1)):

    cell centres      x, y in (12, 32, 52)   (outer cells sit 12 px from the edge so a large
                                              shape fits inside the image with its jitter)
    extent            small 11 px, large 18 px: the side of the bounding box, square for all shapes
    circle            disc of diameter `extent`
    square            axis-aligned square of side `extent`
    triangle          isosceles, apex up, base = height = `extent`; bounding box centred on the cell

Pixels are the mean coverage of 4x4 sub-pixel samples (anti-aliased edges); colours blend
linearly, `bg + (fg - bg) * coverage`, rounded half-to-even. The arithmetic is plain float64
numpy, so images are identical on every platform.

`render(spec)` draws the canonical placement; `render(spec, rng)` adds seeded jitter (centre
+-2 px, extent x[0.92, 1.08], each colour channel +-6) so a dataset has more than one image per
spec. The jitter keeps every attribute unambiguous (see `sdfast.eval.analyse`).

Held-out split: the (shape, colour, position) triple is held out when
`(shape index + colour index + position index) % 9 == 0`. Exactly one position per (shape, colour)
pair is held out, and every pair of attributes still appears together in training, so held-out
prompts test composition, not unseen words. 24 of the 216 triples (11%) are held out.

Dataset layout written by `write_dataset` (kohya fine-tuning style: one plain folder, a caption
`.txt` beside each image):

    out_dir/images/00000.png, 00000.txt, 00001.png, ...
    out_dir/metadata.jsonl    one JSON object per image: file, caption, split, the spec, placement

CLI: `python -m sdfast.data.shapes OUT --n 1000 --seed 0 [--split train|heldout|all]`.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import SdfastError

IMAGE_SIZE = 64
SUPERSAMPLE = 4                       # 4x4 sub-pixel samples per pixel: coverage in steps of 1/16

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB (smallest pairwise distance ~104, between red and orange) and named as people
# name them. Dict order is the colour index used by the held-out rule.
PALETTE = {
    "red": (210, 30, 30),
    "orange": (240, 130, 10),
    "yellow": (250, 230, 40),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(f"{row} {col}" for row in ROWS for col in COLS)   # canonical cell names
SIZES = ("small", "large")
SPLITS = ("train", "heldout", "all")

CELL_CENTERS = (12.0, 32.0, 52.0)     # pixel coordinate of the centre of row/column 0, 1, 2
EXTENTS = {"small": 11.0, "large": 18.0}
POSITION_JITTER = 2.0                 # px, uniform on each axis
SIZE_JITTER = 0.08                    # extent scaled by uniform [1 - j, 1 + j]
COLOR_JITTER = 6                      # per channel, integer uniform in [-6, 6]
HOLDOUT_MODULUS = len(POSITIONS)      # one held-out position per (shape, colour) pair

# Caption vocabulary. `sdfast.eval.analyse.parse_caption` reads captions with these same tables.
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
ROW_WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
CENTER_WORDS = ("center", "centre", "middle")
BACKGROUND_WORDS = ("background", "backdrop")
P_OMIT_SIZE = 0.25                    # captions with variety leave out the size this often,
P_OMIT_BACKGROUND = 0.25              # the background this often,
P_OMIT_POSITION = 0.15                # and the position this often (independently)


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows. Fields are the canonical names above; None means "not specified"
    (a partial spec, as `parse_caption` returns for a caption that omits an attribute)."""

    shape: str | None = None
    color: str | None = None
    position: str | None = None
    size: str | None = None
    background: str | None = None

    def __post_init__(self):
        allowed = {"shape": SHAPES, "color": COLORS, "position": POSITIONS, "size": SIZES,
                   "background": COLORS}
        for name, values in allowed.items():
            value = getattr(self, name)
            if value is not None and value not in values:
                raise SdfastError(f"ShapeSpec.{name}={value!r}: expected one of "
                                  f"{', '.join(values)}")

    def is_complete(self) -> bool:
        """True when every attribute is set."""
        return None not in asdict(self).values()


def _check_drawable(spec: ShapeSpec) -> None:
    if not isinstance(spec, ShapeSpec) or not spec.is_complete():
        raise SdfastError(f"need a complete ShapeSpec, got {spec!r}")
    if spec.color == spec.background:
        raise SdfastError(f"{spec.color} shape on a {spec.background} background: "
                          "colours must differ")


# ----------------------------------------------------------------------------------- the grid
def all_specs() -> tuple[ShapeSpec, ...]:
    """Every drawable combination (background differs from the shape colour), in a fixed order."""
    return _split_specs("all")


def is_held_out(spec: ShapeSpec) -> bool:
    """True when the spec's (shape, colour, position) triple is reserved for evaluation."""
    if spec.shape is None or spec.color is None or spec.position is None:
        raise SdfastError("is_held_out needs shape, color and position")
    index = SHAPES.index(spec.shape) + COLORS.index(spec.color) + POSITIONS.index(spec.position)
    return index % HOLDOUT_MODULUS == 0


def train_specs() -> tuple[ShapeSpec, ...]:
    """The combinations a model may train on."""
    return _split_specs("train")


def heldout_specs() -> tuple[ShapeSpec, ...]:
    """The combinations kept out of training, for evaluating generalisation."""
    return _split_specs("heldout")


@functools.lru_cache(maxsize=None)
def _split_specs(split: str) -> tuple[ShapeSpec, ...]:
    if split not in SPLITS:
        raise SdfastError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    grid = itertools.product(SHAPES, COLORS, POSITIONS, SIZES, COLORS)
    specs = [ShapeSpec(*combo) for combo in grid if combo[1] != combo[4]]
    if split == "all":
        return tuple(specs)
    return tuple(s for s in specs if is_held_out(s) == (split == "heldout"))


def sample_spec(rng: np.random.Generator, split: str = "all") -> ShapeSpec:
    """A uniformly random spec from `split` ("train", "heldout" or "all")."""
    pool = _split_specs(split)
    return pool[int(rng.integers(len(pool)))]


# ---------------------------------------------------------------------------------- rendering
def placement(spec: ShapeSpec, rng: np.random.Generator | None = None) -> dict:
    """Where and how `spec` is drawn: centre `cx, cy` (px), `extent` (px), `fg`/`bg` RGB.

    Without `rng` the canonical placement; with it, seeded jitter (module docstring).
    """
    _check_drawable(spec)
    row, col = _cell_words(spec.position)
    cx, cy = CELL_CENTERS[COLS.index(col)], CELL_CENTERS[ROWS.index(row)]
    extent = EXTENTS[spec.size]
    fg, bg = np.array(PALETTE[spec.color]), np.array(PALETTE[spec.background])
    if rng is not None:
        cx += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
        cy += float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
        extent *= float(rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER))
        fg = np.clip(fg + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        bg = np.clip(bg + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    return {"cx": cx, "cy": cy, "extent": extent, "fg": [int(v) for v in fg],
            "bg": [int(v) for v in bg]}


def _cell_words(position: str) -> tuple[str, str]:
    row, col = position.split()
    return row, col


def coverage(shape: str, cx: float, cy: float, extent: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Fraction of each pixel inside the shape, `[size, size]` float64, from 4x4 sub-samples."""
    samples = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE     # sub-pixel centres, px
    x, y = samples[None, :], samples[:, None]
    half = extent / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half * half
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    elif shape == "triangle":
        top = cy - half                            # apex at (cx, top); half-width grows 0 -> half
        inside = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise SdfastError(f"shape {shape!r}: expected one of {', '.join(SHAPES)}")
    inside = inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)   # [S*4, S*4] -> [S, 4, S, 4]
    return inside.mean(axis=(1, 3))


def render(spec: ShapeSpec, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `spec` as a 64x64 RGB image (canonical placement, or jittered by `rng`)."""
    return draw(spec, placement(spec, rng))


def draw(spec: ShapeSpec, place: dict) -> Image.Image:
    """Draw `spec` at a `placement` (e.g. the `placement` record of a metadata.jsonl row)."""
    _check_drawable(spec)
    cover = coverage(spec.shape, place["cx"], place["cy"], place["extent"])[..., None]
    fg, bg = np.array(place["fg"], np.float64), np.array(place["bg"], np.float64)
    pixels = np.rint(bg + (fg - bg) * cover)                       # [64, 64, 1] -> [64, 64, 3]
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------- captions
def caption(spec: ShapeSpec, rng: np.random.Generator | None = None, variety: bool = True) -> str:
    """The caption of `spec`.

    Canonical ("a large red circle at the top left on a blue background") when `variety` is off
    or no `rng` is given (variety needs a seeded source: captions stay reproducible). With both,
    a random template, synonyms, and size / background / position sometimes left out; colour and
    shape are always named.
    """
    return caption_parts(spec, rng if variety else None)[0]


def caption_parts(spec: ShapeSpec, rng: np.random.Generator | None = None) -> tuple[str, ShapeSpec]:
    """`(caption, mentioned)`: the caption and the partial spec of the attributes it names."""
    _check_drawable(spec)
    keep = {"size": True, "background": True, "position": True}
    template = 0
    if rng is not None:
        keep["size"] = bool(rng.random() >= P_OMIT_SIZE)
        keep["background"] = bool(rng.random() >= P_OMIT_BACKGROUND)
        keep["position"] = bool(rng.random() >= P_OMIT_POSITION)
        template = int(rng.integers(len(_TEMPLATES)))
    size = _pick(rng, SIZE_WORDS[spec.size]) if keep["size"] else None
    phrase, short = _position_phrases(spec.position, rng) if keep["position"] else (None, None)
    bg = spec.background if keep["background"] else None
    text = _TEMPLATES[template](size, spec.color, spec.shape, phrase, short, bg)
    mentioned = ShapeSpec(spec.shape, spec.color, spec.position if keep["position"] else None,
                          spec.size if keep["size"] else None, bg)
    return text, mentioned


def _pick(rng, options):
    """The first option (canonical) without an rng, else a uniform choice."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(size, color, shape) -> str:
    words = [w for w in (size, color, shape) if w]
    return f"{_article(words[0])} {' '.join(words)}"


def _on_background(bg) -> str:
    return f" on {_article(bg)} {bg} background" if bg else ""


def _template_sentence(size, color, shape, phrase, short, bg):
    """a large red circle at the top left on a blue background"""
    return _noun(size, color, shape) + (f" {phrase}" if phrase else "") + _on_background(bg)


def _template_list(size, color, shape, phrase, short, bg):
    """a red circle, large, top left, blue background"""
    parts = [_noun(None, color, shape), size, short, f"{bg} background" if bg else None]
    return ", ".join(p for p in parts if p)


def _template_position_last(size, color, shape, phrase, short, bg):
    """a large red circle on a blue background, at the top left"""
    if not bg:
        return _template_sentence(size, color, shape, phrase, short, bg)
    return _noun(size, color, shape) + _on_background(bg) + (f", {phrase}" if phrase else "")


def _template_background_first(size, color, shape, phrase, short, bg):
    """blue background with a large red circle at the top left"""
    if not bg:
        return _template_sentence(size, color, shape, phrase, short, bg)
    return f"{bg} background with " + _template_sentence(size, color, shape, phrase, short, None)


_TEMPLATES = (_template_sentence, _template_list, _template_position_last,
              _template_background_first)


def _position_phrases(position: str, rng) -> tuple[str, str]:
    """`(phrase, short)` for a cell, e.g. ("at the top left", "top left"); canonical first."""
    row, col = _cell_words(position)
    if row == "middle" and col == "center":
        return f"in the {_pick(rng, CENTER_WORDS)}", _pick(rng, CENTER_WORDS)
    if row == "middle":
        return _pick(rng, (f"on the {col}", f"on the {col} side", f"at the {col}")), col
    if col == "center":
        r, c = _pick(rng, ROW_WORDS[row]), _pick(rng, CENTER_WORDS)
        phrase = _pick(rng, (f"at the {row}", f"near the {row}", f"at the {r} {c}"))
        return phrase, _pick(rng, (row, f"{r} {c}"))
    r = _pick(rng, ROW_WORDS[row])
    phrase = _pick(rng, (f"at the {r} {col}", f"in the {r} {col} corner",
                         f"in the {r}-{col} corner"))
    return phrase, _pick(rng, (f"{r} {col}", f"{r}-{col}"))


# ------------------------------------------------------------------------------------ dataset
_GENERATED = re.compile(r"^\d+\.(png|txt)$")


def write_dataset(out_dir, n: int, seed: int, split: str = "train", overwrite: bool = False,
                  variety: bool = True) -> Path:
    """Write `n` seeded images with captions to `out_dir/images/`; return that folder.

    Images are drawn uniformly from the `split`'s specs ("train" never yields a held-out
    combination), jittered, and captioned (with phrasing variety unless `variety=False`).
    `out_dir/metadata.jsonl` holds each image's ground truth. A non-empty `out_dir` is refused
    unless `overwrite=True`, which first deletes the files an earlier call wrote (numbered
    .png/.txt in images/, and metadata.jsonl) and nothing else.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SdfastError(f"n={n!r}: expected a positive number of images")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SdfastError(f"seed={seed!r}: expected a non-negative integer")
    pool = _split_specs(split)
    out = Path(out_dir)
    images = _prepare_folder(out, overwrite)
    rng = np.random.default_rng(seed)
    width = max(5, len(str(n - 1)))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            spec = pool[int(rng.integers(len(pool)))]
            place = placement(spec, rng)
            text = caption(spec, rng, variety)
            stem = f"{i:0{width}d}"
            draw(spec, place).save(images / f"{stem}.png")
            (images / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
            row = {"file": f"images/{stem}.png", "caption": text, "split": split,
                   **asdict(spec), "placement": place}
            meta.write(json.dumps(row, sort_keys=True) + "\n")
    return images


def _prepare_folder(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise SdfastError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SdfastError(f"{out}: folder is not empty (use overwrite=True / --overwrite)")
        images = out / "images"
        if images.is_dir():
            for path in images.iterdir():
                if path.is_file() and _GENERATED.match(path.name):
                    path.unlink()
        if (out / "metadata.jsonl").is_file():
            (out / "metadata.jsonl").unlink()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    return images


# ---------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line."""

    def error(self, message):
        raise SdfastError(message)


def main(argv=None) -> int:
    """`python -m sdfast.data.shapes OUT --n 1000 --seed 0`; returns the exit code."""
    parser = _Parser(prog="python -m sdfast.data.shapes",
                     description="Write the procedural shapes dataset (images/ + metadata.jsonl).")
    parser.add_argument("out", help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="which combinations to draw from (default train)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already written there")
    parser.add_argument("--canonical", action="store_true",
                        help="canonical captions only (no phrasing variety)")
    try:
        args = parser.parse_args(argv)
        folder = write_dataset(args.out, args.n, args.seed, split=args.split,
                               overwrite=args.overwrite, variety=not args.canonical)
    except (SdfastError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
