"""Parity of every backend available here against the pure-torch reference, per op.

Tolerance (flash-attention's rule, earned rather than guessed): against the reference run in
float64, a backend's fp32 output may be at most twice as far as the reference's own fp32 run,
plus a few fp32 ulps of the output's magnitude (`_diffusers_models.earned_error`). Backends
that cannot run a case (a constraint says why) are skipped for it, never silently replaced.
"""
import pytest
import torch

from _diffusers_models import earned_error
from sdfast import ops
from sdfast.ops import registry

BACKENDS = [b for b in ops.backends("attention") if b != "reference"]
if not BACKENDS:
    pytest.skip("no accelerated backend here (only the reference)", allow_module_level=True)


def _run(op, backend, args):
    impl = registry._impl(op, backend)
    reason = impl.reason(args)
    if reason is not None:
        pytest.skip(f"{backend} cannot run this case: {reason}")


def _layout(x, layout):
    """[B, C, H, W] -> the layout under test (same values)."""
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "bcn":
        return x.flatten(2)  # [B, C, H, W] -> [B, C, H*W]
    if layout == "sliced":
        return torch.cat([x, x], dim=3)[..., : x.shape[3]]  # non-contiguous view
    return x


# C in {320, 640, 1280} x HW in {1, 7x9, 64x64} x layout, sampled so the file stays fast.
GN_CASES = [
    (320, (64, 64), "nchw", True, True),
    (320, (64, 64), "nhwc", False, True),
    (320, (7, 9), "bcn", True, False),
    (640, (7, 9), "nchw", False, False),
    (640, (7, 9), "nhwc", True, True),
    (640, (8, 8), "sliced", True, False),
    (1280, (1, 1), "nchw", True, True),
    (1280, (1, 1), "nhwc", False, False),
    (1280, (7, 9), "nhwc", True, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,hw,layout,silu,add", GN_CASES)
def test_group_norm_matches_reference(backend, c, hw, layout, silu, add):
    g = torch.Generator().manual_seed(c + hw[0])
    x = torch.randn(2, c, *hw, generator=g) * 2 + 0.5
    w, b = 1 + 0.2 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g)
    a = torch.randn(2, c, generator=g) if add else None
    x = _layout(x, layout)
    args = (x, 32, w, b, 1e-5, silu, a)
    _run("group_norm", backend, args)
    out = ops.group_norm(x, 32, w, b, 1e-5, silu=silu, add=a, backend=backend)
    ref32 = ops.group_norm(x, 32, w, b, 1e-5, silu=silu, add=a, backend="reference")
    ref64 = ops.group_norm_ref(x.double(), 32, w.double(), b.double(), 1e-5, silu,
                               None if a is None else a.double())
    assert out.shape == x.shape and out.dtype == x.dtype
    if layout in ("nchw", "nhwc"):
        assert out.stride() == x.stride()  # the input's memory format is kept
    err, bound = earned_error(out, ref32, ref64)
    assert err <= bound, f"max|out - ref64| = {err:.3g} > {bound:.3g}"


def _heads(b, n, h, d, g, layout):
    """[B, heads, N, D] as the models make it (a view of [B, N, heads*D]) or contiguous."""
    t = torch.randn(b, n, h * d, generator=g)
    t = t.view(b, n, h, d).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]
    return t.contiguous() if layout == "contiguous" else t


ATTN_CASES = [  # (B, heads, N, M, D, layout)
    (2, 2, 100, 77, 40, "heads"),
    (1, 2, 65, 77, 64, "contiguous"),
    (2, 1, 33, 154, 80, "heads"),
    (1, 2, 50, 154, 160, "contiguous"),
    (1, 1, 4096, 4096, 40, "heads"),   # SD1.5 64x64 self-attention: the tiled online softmax
    (1, 2, 333, 999, 64, "heads"),     # a key length that is no multiple of any tile
    (1, 1, 7, 1, 8, "contiguous"),     # a single key
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,n,m,d,layout", ATTN_CASES)
def test_attention_matches_reference(backend, b, h, n, m, d, layout):
    g = torch.Generator().manual_seed(n + m + d)
    q, k, v = _heads(b, n, h, d, g, layout), _heads(b, m, h, d, g, layout), _heads(b, m, h, d, g, layout)
    q = q * 2  # sharper softmax rows
    _run("attention", backend, (q, k, v))
    out = ops.attention(q, k, v, backend=backend)
    ref32 = ops.attention(q, k, v, backend="reference")
    ref64 = ops.attention_ref(q.double(), k.double(), v.double())
    assert out.shape == (b, h, n, d) and out.dtype == q.dtype
    err, bound = earned_error(out, ref32, ref64)
    assert err <= bound, f"max|out - ref64| = {err:.3g} > {bound:.3g}"


def _lora64(weight, ups, downs, scales):
    w = weight.double().reshape(weight.shape[0], -1)
    for u, d, s in zip(ups, downs, scales):
        w = w + s * (u.double().reshape(u.shape[0], -1) @ d.double().reshape(d.shape[0], -1))
    return w.reshape(weight.shape)


LORA_CASES = [  # (weight shape, ranks)
    ((320, 768), [1]),
    ((640, 640), [4]),
    ((320, 320), [128]),
    ((1280, 320, 1, 1), [4]),
    ((320, 320, 3, 3), [1, 4]),
    ((64, 33, 3, 3), [128, 4, 1]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,ranks", LORA_CASES)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16])
def test_lora_merge_matches_reference(backend, shape, ranks, factor_dtype):
    g = torch.Generator().manual_seed(sum(shape) + sum(ranks))
    weight = torch.randn(shape, generator=g) * 0.05
    o, rest = shape[0], shape[1:]
    ups = [(torch.randn(o, r, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1).to(factor_dtype)
           for r in ranks]
    downs = [(torch.randn(r, *rest, generator=g) * 0.1).to(factor_dtype) for r in ranks]
    scales = [0.8 - 0.3 * i for i in range(len(ranks))]
    _run("lora_merge", backend, (weight, ups, downs, scales))
    ref64 = _lora64(weight, ups, downs, scales)
    ref32 = ops.lora_merge_(weight.clone(), ups, downs, scales, backend="reference")
    out = weight.clone()
    assert ops.lora_merge_(out, ups, downs, scales, backend=backend) is out
    err, bound = earned_error(out, ref32, ref64)
    assert err <= bound, f"max|out - ref64| = {err:.3g} > {bound:.3g}"


def test_lora_merge_single_tensor_form_and_non_contiguous_weight():
    backend = BACKENDS[0]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 80, generator=g)
    weight = base.t()  # [80, 96], not contiguous
    up, down = torch.randn(80, 8, generator=g), torch.randn(8, 96, generator=g)
    expect = weight + 0.5 * up @ down
    ops.lora_merge_(weight, up, down, 0.5, backend=backend)
    torch.testing.assert_close(base.t(), expect, rtol=1e-5, atol=1e-5)


def _cmake_build_dir():
    """The CMake build dir to run ctest in: $SDFAST_CMAKE_BUILD_DIR, else setup.py's
    build/temp.*/cmake when a `python setup.py build_ext` left one."""
    import glob
    import os

    cands = [os.environ.get("SDFAST_CMAKE_BUILD_DIR", "")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cands += [os.path.join(root, "build", "cmake")]
    cands += sorted(glob.glob(os.path.join(root, "build", "temp*", "cmake")))
    for d in cands:
        if d and os.path.exists(os.path.join(d, "CTestTestfile.cmake")):
            return d
    return None


def test_ctest_cpu_kernels():
    """Runs the C++ tests (csrc/tests) in an existing CMake build dir; builds nothing.
    To make one: cmake -S . -B build/cmake -DPython_EXECUTABLE=$(which python)
    -Dpybind11_DIR=$(python -m pybind11 --cmakedir) && cmake --build build/cmake -j1,
    then SDFAST_CMAKE_BUILD_DIR=build/cmake pytest tests/test_ops_cpu.py -k ctest."""
    import shutil
    import subprocess

    build = _cmake_build_dir()
    if build is None or shutil.which("ctest") is None:
        pytest.skip("no CMake build dir with tests (set SDFAST_CMAKE_BUILD_DIR) or no ctest")
    out = subprocess.run(["ctest", "--test-dir", build, "--output-on-failure"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
