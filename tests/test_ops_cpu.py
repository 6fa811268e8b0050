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


def _cpu_isas():
    """The instruction sets the cpu backend's kernels can run with here (avx2, avx512)."""
    from sdfast.ops import cpu_backend
    if "cpu" not in BACKENDS:
        return []
    return [isa for isa in ("avx2", "avx512") if cpu_backend._C.cpu_isa_available(isa)]


# Every backend, the cpu backend once per instruction set it can run with here.
BACKEND_PARAMS = [pytest.param(b, isa, id=f"{b}-{isa}") for b in BACKENDS
                  for isa in (_cpu_isas() if b == "cpu" else [None])]


@pytest.fixture
def backend(request):
    """The backend name; for the cpu backend its kernels forced to the case's ISA meanwhile."""
    name, isa = request.param
    if isa is None:
        yield name
        return
    from sdfast.ops import cpu_backend
    before = cpu_backend._C.cpu_isa()
    assert cpu_backend._C.set_cpu_isa(isa)
    try:
        yield name
    finally:
        cpu_backend._C.set_cpu_isa(before)


def _backends_param(fn):
    return pytest.mark.parametrize("backend", [p.values for p in BACKEND_PARAMS], indirect=True,
                                   ids=[p.id for p in BACKEND_PARAMS])(fn)


def _with_backends(names, cases, light=lambda case: True):
    """parametrize over backends x cases; a case that is not `light` runs on one ISA only
    (csrc/tests covers every ISA on small sizes)."""
    params = []
    for p in BACKEND_PARAMS:
        first_isa = p.values[1] in (None, _cpu_isas()[0])
        params += [pytest.param(p.values, *case, id=f"{p.id}-{'-'.join(map(str, case))}")
                   for case in cases if first_isa or light(case)]
    return pytest.mark.parametrize(f"backend,{names}", params, indirect=["backend"])


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


# The matrix: C in {320, 640, 1280} (32 groups) x HW in {1, 7x9, 64x64} x both layouts,
# SiLU and the time-embedding add alternating; then [B, C, N] and a non-contiguous view.
GN_CASES = [(c, hw, layout, (i + j) % 2 == 0, (i + j + k) % 2 == 1)
            for i, c in enumerate((320, 640, 1280))
            for j, hw in enumerate(((1, 1), (7, 9), (64, 64)))
            for k, layout in enumerate(("nchw", "nhwc"))] + [
    (320, (7, 9), "bcn", True, False),
    (1280, (64, 64), "bcn", True, True),
    (640, (8, 8), "sliced", True, False),
]


@_with_backends("c,hw,layout,silu,add", GN_CASES, light=lambda case: case[1] != (64, 64))
def test_group_norm_matches_reference(backend, c, hw, layout, silu, add):
    g = torch.Generator().manual_seed(c + hw[0])
    batch = 1 if hw == (64, 64) else 2  # (the float64 reference is the slow part)
    x = torch.randn(batch, c, *hw, generator=g) * 2 + 0.5
    w, b = 1 + 0.2 * torch.randn(c, generator=g), 0.2 * torch.randn(c, generator=g)
    a = torch.randn(batch, c, generator=g) if add else None
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


ATTN_CASES = [  # (B, heads, N, M, D, layout): head dims 40, 64, 80, 160 x 77 and 154 keys
    (2, 2, 100, 77, 40, "heads"),
    (1, 2, 65, 154, 40, "contiguous"),
    (1, 2, 65, 77, 64, "contiguous"),
    (2, 1, 70, 154, 64, "heads"),
    (2, 1, 33, 154, 80, "heads"),
    (1, 2, 97, 77, 80, "contiguous"),
    (1, 2, 50, 154, 160, "contiguous"),
    (2, 2, 49, 77, 160, "heads"),
    (1, 1, 4096, 4096, 40, "heads"),   # SD1.5 64x64 self-attention: the tiled online softmax
                                       # (cpu: queries in the vector lanes, csrc/cpu/attention.cpp)
    (1, 1, 200, 2100, 80, "contiguous"),  # cpu: the lanes layout at a whole-vector head dim
    (2, 2, 97, 700, 40, "heads"),      # cpu: the lanes layout on the models' strided heads
    (1, 2, 333, 999, 64, "heads"),     # a key length that is no multiple of any tile
    (1, 1, 7, 1, 8, "contiguous"),     # a single key
]


@_with_backends("b,h,n,m,d,layout", ATTN_CASES, light=lambda case: case[2] * case[3] < 2 ** 20)
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


@_backends_param
@pytest.mark.parametrize("shape,ranks", LORA_CASES)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16, torch.bfloat16])
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


@_backends_param
def test_lora_merge_many_weights_in_one_call(backend):
    """The list form: several weights (linear and conv, one with two LoRAs, one with fp16
    factors) merged in one call equal each merged alone by the reference."""
    g = torch.Generator().manual_seed(5)
    shapes = [((320, 768), [4]), ((64, 33, 3, 3), [1, 128]), ((1280, 320, 1, 1), [4]), ((7, 5), [1])]
    weights, ups, downs, scales = [], [], [], []
    for i, (shape, ranks) in enumerate(shapes):
        o, rest = shape[0], shape[1:]
        conv = [1, 1] if len(shape) == 4 else []
        dtype = torch.float16 if i == 2 else torch.float32
        weights.append(torch.randn(shape, generator=g) * 0.05)
        ups.append([(torch.randn(o, r, *conv, generator=g) * 0.1).to(dtype) for r in ranks])
        downs.append([(torch.randn(r, *rest, generator=g) * 0.1).to(dtype) for r in ranks])
        scales.append([0.7 - 0.2 * j for j in range(len(ranks))])
    _run("lora_merge", backend, (weights[0], ups[0], downs[0], scales[0]))
    outs = [w.clone() for w in weights]
    assert ops.lora_merge_(outs, ups, downs, scales, backend=backend) is outs
    for w, out, u, d, s in zip(weights, outs, ups, downs, scales):
        ref32 = ops.lora_merge_(w.clone(), u, d, s, backend="reference")
        err, bound = earned_error(out, ref32, _lora64(w, u, d, s))
        assert err <= bound, f"{tuple(w.shape)}: max|out - ref64| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_lora_merge_from_a_base_equals_a_copy_merged_in_place(backend):
    """base=: weight (whatever it held) becomes base + the LoRAs, bit for bit what merging into
    a copy of base gives on the same backend, base unchanged; in the list form too, with None
    entries merging in place and a LoRA-less entry copying base; a base without a unit-stride
    view (transposed) takes the copy-then-merge path with the same result."""
    g = torch.Generator().manual_seed(11)
    shapes = [((320, 768), [32]), ((64, 33, 3, 3), [4, 1]), ((7, 1100), [2]), ((40, 24), [])]
    bases, ups, downs, scales = [], [], [], []
    for shape, ranks in shapes:
        o, rest = shape[0], shape[1:]
        conv = [1, 1] if len(shape) == 4 else []
        bases.append(torch.randn(shape, generator=g) * 0.05)
        ups.append([torch.randn(o, r, *conv, generator=g) * 0.1 for r in ranks])
        downs.append([torch.randn(r, *rest, generator=g) * 0.1 for r in ranks])
        scales.append([0.6 + 0.1 * j for j in range(len(ranks))])
    kept = [b.clone() for b in bases]
    expect = [ops.lora_merge_(b.clone(), u, d, s, backend=backend) if u else b.clone()
              for b, u, d, s in zip(bases, ups, downs, scales)]
    for b, u, d, s, e in zip(bases, ups, downs, scales, expect):
        out = torch.full_like(b, 7.0)
        _run("lora_merge", backend, (out, u, d, s, b))
        assert ops.lora_merge_(out, u, d, s, backend=backend, base=b) is out
        assert torch.equal(out, e), tuple(b.shape)
    outs = [torch.full_like(b, -3.0) for b in bases]
    outs[1] = bases[1].clone()                               # this one merges in place
    ops.lora_merge_(outs, ups, downs, scales, backend=backend,
                    base=[bases[0], None, bases[2], bases[3]])
    for out, e in zip(outs, expect):
        assert torch.equal(out, e), tuple(e.shape)
    for b, k in zip(bases, kept):
        assert torch.equal(b, k)
    bt = bases[0].t().contiguous().t()                      # no [O, I] view with unit stride
    out = torch.zeros_like(bases[0])
    ops.lora_merge_(out, ups[0], downs[0], scales[0], backend=backend, base=bt)
    assert torch.equal(out, expect[0])


def test_lora_merge_base_checks():
    w = torch.zeros(4, 5)
    up, down = torch.zeros(4, 1), torch.zeros(1, 5)
    with pytest.raises(ops.SdfastError, match="base is .* they must match"):
        ops.lora_merge_(w, up, down, 1.0, base=torch.zeros(4, 6))
    with pytest.raises(ops.SdfastError, match="base is .* they must match"):
        ops.lora_merge_(w, up, down, 1.0, base=torch.zeros(4, 5, dtype=torch.float64))
    big = torch.zeros(8, 5)
    with pytest.raises(ops.SdfastError, match="shares memory"):
        ops.lora_merge_(big[:4], up, down, 1.0, base=big[4:])
    with pytest.raises(ops.SdfastError, match="1 bases"):
        ops.lora_merge_([w, w], [up, up], [down, down], [1.0, 1.0], base=[None])
    w = torch.ones(4, 5)
    ops.lora_merge_(w, torch.ones(4, 1), torch.ones(1, 5), 2.0, base=w)   # itself: in place
    assert torch.equal(w, torch.full((4, 5), 3.0))


def test_lora_merge_list_form_checks_lengths():
    w = torch.zeros(4, 5)
    with pytest.raises(ops.SdfastError, match="2 weights but 1 ups"):
        ops.lora_merge_([w, w], [torch.zeros(4, 1)], [torch.zeros(1, 5)], [1.0])


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


def test_cpu_kernels_called_from_several_threads_at_once():
    # The cpu kernels keep buffers between calls (attention's packed K/V per calling thread,
    # Winograd's per worker thread); calls from several Python threads at once (the GIL is
    # released inside) must each get exactly what one call alone gets.
    import threading

    if "cpu" not in BACKENDS:
        pytest.skip("no cpu backend here")
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(1, 2, n, 40, generator=g) for n in (600, 700, 900)]  # > 512 keys: tiled
    xs = [torch.randn(1, c, 19, 23, generator=g).contiguous(memory_format=torch.channels_last)
          for c in (32, 48)]
    ws = [torch.randn(16, x.shape[1], 3, 3, generator=g) for x in xs]
    alone = ([ops.attention(q, q, q, backend="cpu") for q in qs],
             [ops.conv2d(x, w, padding=1, backend="cpu") for x, w in zip(xs, ws)])
    mismatches = []

    def work():
        for _ in range(4):
            for q, want in zip(qs, alone[0]):
                mismatches.append(not torch.equal(ops.attention(q, q, q, backend="cpu"), want))
            for x, w, want in zip(xs, ws, alone[1]):
                mismatches.append(not torch.equal(ops.conv2d(x, w, padding=1, backend="cpu"), want))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mismatches) == 3 * 4 * 5 and not any(mismatches)
