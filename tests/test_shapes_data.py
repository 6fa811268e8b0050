"""The procedural shapes dataset: grid, held-out split, rendering, captions, folders and CLI."""
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdfast.data.shapes import (COLORS, PALETTE, POSITIONS, SHAPES, SIZES, ShapeSpec, all_specs,
                                caption, caption_parts, draw, heldout_specs, is_held_out, main,
                                placement, render, sample_spec, train_specs, write_dataset)
from sdfast.errors import SdfastError

RED_CIRCLE = ShapeSpec("circle", "red", "top left", "large", "blue")


# ------------------------------------------------------------------------------ grid and split
def test_palette_colours_are_far_apart():
    pairs = itertools.combinations(PALETTE.values(), 2)
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in pairs) > 100


def test_all_specs_is_the_full_grid_without_same_colour_backgrounds():
    specs = all_specs()
    expected = len(SHAPES) * len(COLORS) * len(POSITIONS) * len(SIZES) * (len(COLORS) - 1)
    assert len(specs) == len(set(specs)) == expected
    assert all(s.is_complete() and s.color != s.background for s in specs)


def test_split_partitions_the_grid_and_keeps_every_pair_in_training():
    train, held = set(train_specs()), set(heldout_specs())
    assert train.isdisjoint(held) and train | held == set(all_specs())
    assert all(is_held_out(s) for s in held) and not any(is_held_out(s) for s in train)
    assert 0.05 < len(held) / len(all_specs()) < 0.2
    triples = {(s.shape, s.color, s.position) for s in held}
    assert all(is_held_out(ShapeSpec(*t)) for t in triples)
    # Held-out prompts are new combinations of words the model has seen in every pairing.
    seen = {(s.shape, s.color, s.position) for s in train}
    for a, b in itertools.combinations(range(3), 2):
        pairs = {(t[a], t[b]) for t in seen}
        options = (SHAPES, COLORS, POSITIONS)
        assert pairs == set(itertools.product(options[a], options[b]))


def test_sample_spec_respects_split():
    rng = np.random.default_rng(0)
    assert not any(is_held_out(sample_spec(rng, "train")) for _ in range(300))
    assert all(is_held_out(sample_spec(rng, "heldout")) for _ in range(50))
    # Unfiltered sampling does reach held-out combinations (so the check above can fail).
    assert any(is_held_out(sample_spec(rng)) for _ in range(300))


def test_spec_validation():
    with pytest.raises(SdfastError, match="color"):
        ShapeSpec("circle", "teal", "top left", "large", "blue")
    with pytest.raises(SdfastError, match="must differ"):
        render(ShapeSpec("circle", "red", "top left", "large", "red"))
    with pytest.raises(SdfastError, match="complete"):
        render(ShapeSpec("circle", "red"))


# ---------------------------------------------------------------------------------- rendering
def _coverage_from_pixels(image, fg, bg):
    """Per-pixel shape coverage recovered from blended colours (on the widest channel)."""
    fg, bg = np.asarray(fg, float), np.asarray(bg, float)
    ch = int(np.argmax(np.abs(fg - bg)))
    return (np.asarray(image, float)[..., ch] - bg[ch]) / (fg[ch] - bg[ch])


@pytest.mark.parametrize("shape,area", [("circle", np.pi * 9 ** 2), ("square", 18.0 ** 2),
                                        ("triangle", 18.0 ** 2 / 2)])
def test_render_geometry_and_antialiasing(shape, area):
    spec = ShapeSpec(shape, "yellow", "middle center", "large", "blue")
    image = render(spec)
    assert image.size == (64, 64) and image.mode == "RGB"
    cover = _coverage_from_pixels(image, PALETTE["yellow"], PALETTE["blue"])
    assert abs(cover.sum() - area) < 0.02 * area                 # the analytic area, 18 px extent
    assert np.array_equal(np.asarray(image)[32, 32], PALETTE["yellow"])
    assert np.array_equal(np.asarray(image)[0, 0], PALETTE["blue"])
    # Off the pixel grid (jittered), edges are anti-aliased: partial coverage at several levels.
    rng = np.random.default_rng(4)
    place = placement(spec, rng)
    jittered = render(spec, np.random.default_rng(4))
    cover = _coverage_from_pixels(jittered, place["fg"], place["bg"])
    edge = (cover > 0.03) & (cover < 0.97)
    assert edge.sum() > 30 and len(np.unique(np.round(cover[edge], 1))) >= 3


def test_render_places_the_shape_in_its_cell():
    for position in POSITIONS:
        cover = _coverage_from_pixels(render(ShapeSpec("square", "white", position, "small",
                                                       "black")), PALETTE["white"],
                                      PALETTE["black"])
        ys, xs = np.nonzero(cover > 0.5)
        row, col = int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))
        assert POSITIONS[3 * row + col] == position


def test_render_is_deterministic_and_jitter_varies():
    a = np.asarray(render(RED_CIRCLE, np.random.default_rng(5)))
    b = np.asarray(render(RED_CIRCLE, np.random.default_rng(5)))
    c = np.asarray(render(RED_CIRCLE, np.random.default_rng(6)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.asarray(render(RED_CIRCLE)), np.asarray(render(RED_CIRCLE)))


# ----------------------------------------------------------------------------------- captions
def test_canonical_captions():
    assert caption(RED_CIRCLE, variety=False) == \
        "a large red circle at the top left on a blue background"
    centre = ShapeSpec("square", "orange", "middle center", "small", "white")
    assert caption(centre) == "a small orange square in the center on a white background"
    assert caption(centre, np.random.default_rng(0), variety=False) == caption(centre)


def test_caption_variety():
    rng = np.random.default_rng(0)
    texts = [caption(RED_CIRCLE, rng) for _ in range(300)]
    assert len(set(texts)) > 30
    joined = " ".join(texts)
    for word in ("upper", "big", "corner", "top-left"):
        assert word in joined
    assert any(t.startswith("blue background") for t in texts)               # word order
    assert any(", large" in t for t in texts)                                # list form
    assert any("large" not in t and "big" not in t for t in texts)           # size omitted
    assert any("background" not in t for t in texts)                         # background omitted
    assert any("left" not in t for t in texts)                               # position omitted
    assert all("red circle" in t for t in texts)                             # always named
    centre = ShapeSpec("circle", "red", "middle center", "large", "blue")
    centre_texts = {caption(centre, rng) for _ in range(200)}
    for phrase in ("in the center", "in the centre", "in the middle"):
        assert any(phrase in t for t in centre_texts)


def test_caption_parts_reports_what_was_mentioned():
    rng = np.random.default_rng(1)
    for _ in range(100):
        spec = sample_spec(rng)
        text, mentioned = caption_parts(spec, rng)
        assert mentioned.shape == spec.shape and mentioned.color == spec.color
        assert (mentioned.background is None) == ("background" not in text)


# ------------------------------------------------------------------------------------ dataset
def _read_meta(out):
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_write_dataset_layout_and_ground_truth(tmp_path):
    out = tmp_path / "ds"
    folder = write_dataset(out, 12, seed=3)
    assert folder == out / "images"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{i:05d}.{ext}" for i in range(12) for ext in ("png", "txt"))
    rows = _read_meta(out)
    assert [r["file"] for r in rows] == [f"images/{i:05d}.png" for i in range(12)]
    for row in rows:
        stem = row["file"][len("images/"):-len(".png")]
        assert (folder / f"{stem}.txt").read_text().strip() == row["caption"]
        spec = ShapeSpec(*(row[k] for k in ("shape", "color", "position", "size", "background")))
        with Image.open(out / row["file"]) as img:
            pixels = np.asarray(img.convert("RGB"))
        # The metadata reproduces the image exactly: it is the ground truth.
        assert np.array_equal(np.asarray(draw(spec, row["placement"])), pixels)


def test_write_dataset_is_deterministic(tmp_path):
    write_dataset(tmp_path / "a", 8, seed=7)
    write_dataset(tmp_path / "b", 8, seed=7)
    write_dataset(tmp_path / "c", 8, seed=8)
    files = [f"images/{i:05d}.{ext}" for i in range(8) for ext in ("png", "txt")]
    for name in ["metadata.jsonl"] + files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "metadata.jsonl").read_bytes() != \
        (tmp_path / "c" / "metadata.jsonl").read_bytes()


def test_train_split_never_contains_held_out_combinations(tmp_path):
    write_dataset(tmp_path / "train", 400, seed=0, split="train", variety=False)
    rows = _read_meta(tmp_path / "train")
    specs = [ShapeSpec(*(r[k] for k in ("shape", "color", "position", "size", "background")))
             for r in rows]
    assert not any(is_held_out(s) for s in specs)
    assert len({(s.shape, s.color, s.position) for s in specs}) > 120        # broad coverage
    write_dataset(tmp_path / "held", 20, seed=0, split="heldout")
    assert all(is_held_out(ShapeSpec(r["shape"], r["color"], r["position"]))
               for r in _read_meta(tmp_path / "held"))


def test_write_dataset_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "ds"
    write_dataset(out, 5, seed=0)
    (out / "notes.md").write_text("keep me")
    with pytest.raises(SdfastError, match="not empty"):
        write_dataset(out, 3, seed=1)
    assert len(_read_meta(out)) == 5
    write_dataset(out, 3, seed=1, overwrite=True)
    assert len(list((out / "images").iterdir())) == 6 and len(_read_meta(out)) == 3
    assert (out / "notes.md").read_text() == "keep me"
    with pytest.raises(SdfastError):
        write_dataset(tmp_path / "x", 0, seed=0)
    with pytest.raises(SdfastError, match="split"):
        write_dataset(tmp_path / "y", 2, seed=0, split="test")


# ---------------------------------------------------------------------------------------- CLI
def test_cli_writes_and_reports_one_line_errors(tmp_path, capsys):
    assert main([str(tmp_path / "ds"), "--n", "4", "--seed", "2"]) == 0
    assert len(_read_meta(tmp_path / "ds")) == 4
    capsys.readouterr()
    for argv in ([str(tmp_path / "ds"), "--n", "4"],                   # not empty
                 [str(tmp_path / "n"), "--n", "-1"],
                 [str(tmp_path / "n"), "--n", "many"],
                 [str(tmp_path / "n"), "--split", "test"],
                 []):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


def test_cli_module_entry_point(tmp_path):
    out = tmp_path / "ds"
    done = subprocess.run([sys.executable, "-m", "sdfast.data.shapes", str(out), "--n", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (out / "images" / "00001.png").is_file()
    done = subprocess.run([sys.executable, "-m", "sdfast.data.shapes", str(out), "--n", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
