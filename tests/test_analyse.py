"""The shapes analyser: accuracy on ground truth, robustness, garbage input, captions, scores."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdfast.data.shapes import (COLORS, PALETTE, ShapeSpec, caption, caption_parts, render,
                                sample_spec)
from sdfast.errors import SdfastError
from sdfast.eval.analyser import ATTRIBUTES, Analysis, analyse, parse_caption, score

N_SAMPLES = 300
NOISE_SIGMA = 12.0      # per-channel Gaussian noise, in 0..255 units (~5% of the range)
BLUR_RADIUS = 1.0       # PIL GaussianBlur radius (its standard deviation), px at 64x64
COLOR_SHIFT = 10        # global per-channel colour cast, uniform in [-10, 10]


def _samples(seed, n=N_SAMPLES, split="all"):
    """Seeded ground-truth pairs (spec, jittered image) over the whole grid."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        spec = sample_spec(rng, split)
        pairs.append((spec, render(spec, rng)))
    return pairs


def _perturb(image, rng):
    """What a small generative model's output looks like next to the clean render: softer
    edges, a slight colour cast, and pixel noise."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), np.float64)
    cast = rng.integers(-COLOR_SHIFT, COLOR_SHIFT + 1, 3)
    noisy = blurred + cast + rng.normal(0.0, NOISE_SIGMA, blurred.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ground_truth():
    return _samples(seed=11)


# ---------------------------------------------------------------------------------- accuracy
def test_accuracy_on_ground_truth_images(ground_truth):
    specs, images = zip(*ground_truth)
    result = score(specs, images)
    assert result["n"] == N_SAMPLES
    for name in ATTRIBUTES:
        assert result["counts"][name] == N_SAMPLES
        assert result[name] >= 0.98, (name, result)


def test_accuracy_under_blur_noise_and_colour_cast(ground_truth):
    # At this perturbation the analyser measured 99-100% on every attribute (300 samples);
    # 95% leaves room for sampling variation (binomial SD ~0.6%) but fails a classifier that
    # is not robust: plain best-IoU-template matching measured 91% on shape here.
    rng = np.random.default_rng(12)
    specs, images = zip(*ground_truth)
    result = score(specs, [_perturb(img, rng) for img in images])
    for name in ATTRIBUTES:
        assert result[name] >= 0.95, (name, result)


def test_larger_and_float_inputs_give_the_same_reading(ground_truth):
    for spec, image in ground_truth[:20]:
        big = image.resize((256, 256), Image.Resampling.BICUBIC)
        chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0     # [3, 64, 64] in 0..1
        assert analyse(big) == analyse(chw) == analyse(image) == Analysis(
            spec.color, spec.shape, spec.position, spec.size, spec.background)


def test_every_cell_colour_and_shape_on_canonical_renders():
    for shape in ("circle", "square", "triangle"):
        for i, color in enumerate(COLORS):
            background = COLORS[(i + 3) % len(COLORS)]
            for position in ("top left", "middle center", "bottom right", "top center"):
                for size in ("small", "large"):
                    spec = ShapeSpec(shape, color, position, size, background)
                    assert analyse(render(spec)).as_spec() == spec


# ------------------------------------------------------------------------------ bad images
@pytest.mark.parametrize("image", [
    np.zeros((64, 64, 3), np.uint8),
    np.full((64, 64, 3), 255, np.uint8),
    np.zeros((0, 0, 3), np.uint8),
    np.zeros((1, 1), np.uint8),
    np.full((64, 64), np.nan),
    np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8),
    np.random.default_rng(1).random((32, 48, 4)),
    Image.new("RGB", (100, 60), PALETTE["green"]),
], ids=["black", "white", "empty", "1x1", "nan", "noise", "rgba-float", "flat-green"])
def test_garbage_images_do_not_crash(image):
    found = analyse(image)
    assert isinstance(found, Analysis)
    assert all(v is None or isinstance(v, str) for v in (found.color, found.shape, found.position))


def test_flat_image_has_background_but_no_shape():
    found = analyse(Image.new("RGB", (64, 64), PALETTE["purple"]))
    assert found == Analysis(background="purple")
    grey = 128 + np.random.default_rng(0).integers(-3, 4, (64, 64, 3))
    found = analyse(grey.astype(np.uint8))
    assert found.shape is None and found.color is None


def test_bad_array_shapes_raise_clear_errors(tmp_path):
    with pytest.raises(SdfastError):
        analyse(np.zeros((4, 4, 4, 4)))
    with pytest.raises(SdfastError):
        analyse(np.array(["a", "b"]))
    with pytest.raises(SdfastError, match="readable"):
        analyse(tmp_path / "missing.png")


# ----------------------------------------------------------------------------------- captions
def test_parse_caption_recovers_every_caption_variety():
    rng = np.random.default_rng(5)
    for _ in range(600):
        spec = sample_spec(rng)
        text, mentioned = caption_parts(spec, rng)
        assert parse_caption(text) == mentioned, text
        assert parse_caption(caption(spec, variety=False)) == spec


@pytest.mark.parametrize("text,expected", [
    ("A big Red Circle in the upper-left corner, on a blue background.",
     ShapeSpec("circle", "red", "top left", "large", "blue")),
    ("green background with a little white triangle at the lower right",
     ShapeSpec("triangle", "white", "bottom right", "small", "green")),
    ("a purple square in the centre", ShapeSpec("square", "purple", "middle center")),
    ("orange triangle, bottom middle, background of black",
     ShapeSpec("triangle", "orange", "bottom center", None, "black")),
    ("a yellow circle on the right side", ShapeSpec("circle", "yellow", "middle right")),
    ("a cat", ShapeSpec()),
])
def test_parse_caption_on_hand_written_prompts(text, expected):
    assert parse_caption(text) == expected


# ------------------------------------------------------------------------------------ score
def test_score_counts_only_named_attributes_and_detects_mismatch(ground_truth):
    pairs = ground_truth[:40]
    specs, images = [p[0] for p in pairs], [p[1] for p in pairs]
    prompts = [f"a {s.color} {s.shape}" for s in specs]              # colour and shape only
    result = score(prompts, images)
    assert result["counts"] == {"color": 40, "shape": 40, "position": 0, "size": 0,
                                "background": 0}
    assert result["position"] is None and result["color"] == result["all"] == 1.0
    rows = [{"shape": s.shape, "color": s.color, "position": s.position} for s in specs]
    assert score(rows, [analyse(i) for i in images])["all"] == 1.0
    # Pair each prompt with another prompt's image: accuracy must drop to chance levels.
    shuffled = score(specs, images[1:] + images[:1])
    assert shuffled["all"] < 0.2 and shuffled["color"] < 0.5


def test_score_input_checks():
    assert score([], [])["n"] == 0
    with pytest.raises(SdfastError, match="prompts"):
        score(["a red circle"], [])
    with pytest.raises(SdfastError):
        score([42], [np.zeros((64, 64, 3), np.uint8)])
