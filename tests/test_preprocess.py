"""Built-in control-image preprocessors (no downloads): canny and binary."""
import numpy as np
import pytest
from PIL import Image

from sdfast.addons.preprocess import binary, canny, preprocess
from sdfast.errors import SdfastError


def square(size=64, lo=16, hi=48, value=255):
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[lo:hi, lo:hi] = value
    return Image.fromarray(pixels)


def test_canny_finds_a_squares_outline_and_nothing_else():
    edges = np.asarray(canny(square()))[..., 0] > 0
    assert edges.any()
    ys, xs = np.nonzero(edges)
    # every edge pixel lies on the square's border (within one pixel of it)
    on_border = (np.minimum(np.abs(ys - 16), np.abs(ys - 47)) <= 1) | (np.minimum(np.abs(xs - 16), np.abs(xs - 47)) <= 1)
    inside_box = (ys >= 14) & (ys <= 49) & (xs >= 14) & (xs <= 49)
    assert (on_border & inside_box).all()
    # and each side of the border is found along most of its length
    for line in (edges[15:18, 20:44].any(axis=0), edges[46:49, 20:44].any(axis=0),
                 edges[20:44, 15:18].any(axis=1), edges[20:44, 46:49].any(axis=1)):
        assert line.mean() > 0.9
    thin = edges[20:44, :].sum(axis=1)
    assert (thin <= 4).all()                                   # non-maximum suppression: thin lines


def test_canny_thresholds_and_hysteresis():
    faint = square(value=60)                                   # Sobel L1 magnitude about 240
    assert not np.asarray(canny(faint, 300, 400)).any()
    assert np.asarray(canny(faint, 100, 200)).any()
    # a weak edge survives only where it connects to a strong one
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 40                                        # weak step (magnitude ~160)
    pixels[:8, 32:] = 255                                      # strong at the top of the same edge
    joined = np.asarray(canny(Image.fromarray(pixels), 100, 500))[..., 0] > 0
    alone = np.asarray(canny(Image.fromarray(pixels[12:]), 100, 500))[..., 0] > 0
    assert joined[8:, 30:34].any() and not alone.any()
    with pytest.raises(ValueError):
        canny(faint, 200, 100)


def test_binary_and_names():
    out = np.asarray(binary(square(value=200), threshold=127))
    assert out.shape == (64, 64, 3) and set(np.unique(out)) == {0, 255}
    assert out[30, 30, 0] == 255 and out[2, 2, 0] == 0
    assert np.asarray(binary(square(value=100))).max() == 0
    assert np.array_equal(np.asarray(preprocess("canny", square())), np.asarray(canny(square())))
    with pytest.raises(SdfastError, match="unknown preprocessor"):
        preprocess("depth", square())
