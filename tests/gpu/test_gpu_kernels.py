"""Every CUDA and Triton kernel on a real GPU against the pure-torch reference.

Tolerance as in flash-attention's tests: max|out - ref32| <= 2 * max|ref_lowp - ref32| + atol,
with the references computed in fp32 and in the input dtype. Skipped without a CUDA device.
"""
import pytest
import torch

from sdfast.kernels.attention import attention_ref
from sdfast.kernels.group_norm import group_norm_ref
from sdfast.kernels.lora_merge import lora_merge_ref
from sdfast.ops import cuda_backend, triton_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BACKENDS = {"triton": triton_backend, "cuda": cuda_backend}


def backend(name):
    module = BACKENDS[name]
    if not module.available():
        pytest.skip(f"{name} backend unavailable (Triton missing / sdfast._C_cuda not built)")
    return module


def assert_earned(out, ref32, ref_lowp):
    err = (out.float() - ref32).abs().max().item()
    budget = 2 * (ref_lowp.float() - ref32).abs().max().item() + ATOL[out.dtype]
    assert err <= budget, f"max error {err:.3g} > earned tolerance {budget:.3g}"


def rand(*shape, dtype, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale + shift).to(dtype)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,layout", [
    # the matrix: C in {320, 640, 1280} x HW in {1, 7x9, 64x64} x both layouts
    *[((2, c, *hw), 32, layout) for c in (320, 640, 1280) for hw in ((1, 1), (7, 9), (64, 64))
      for layout in ("nchw", "channels_last")],
    ((2, 320, 33, 17), 32, "channels_last"),
    ((1, 1280, 8, 8), 32, "channels_last"),
    ((2, 512, 1000), 32, "bcn"),
])
@pytest.mark.parametrize("silu,with_add", [(False, False), (True, True)])
def test_group_norm(name, dtype, shape, groups, layout, silu, with_add):
    be = backend(name)
    x = rand(*shape, dtype=dtype, scale=3.0, shift=1.0)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w, b = rand(C, dtype=dtype, seed=1), rand(C, dtype=dtype, seed=2)
    add = rand(shape[0], C, dtype=dtype, seed=3) if with_add else None
    assert be.supports_group_norm(x, groups, w, b, 1e-5, silu, add) is True
    out = be.group_norm(x, groups, w, b, 1e-5, silu, add)
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    ref32 = group_norm_ref(x.float(), groups, w.float(), b.float(), 1e-5, silu, f32(add))
    assert out.shape == x.shape and out.dtype == dtype
    assert_earned(out, ref32, group_norm_ref(x, groups, w, b, 1e-5, silu, add))


def _qkv(B, H, N, M, D, dtype):
    return [rand(B, H, n, D, dtype=dtype, seed=s) for s, n in enumerate((N, M, M))]


def _check_attention(fn, q, k, v):
    out = fn(q, k, v)
    ref32 = attention_ref(q.float(), k.float(), v.float())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_earned(out, ref32, attention_ref(q, k, v))


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 80, 160])
@pytest.mark.parametrize("N,M", [(1024, 77), (1000, 154), (1000, 1000), (4096, 4096)])
def test_attention(name, dtype, D, N, M):
    be = backend(name)
    q, k, v = _qkv(2, 2, N, M, D, dtype)
    assert be.supports_attention(q, k, v) is True
    _check_attention(be.attention, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 80, 160])
@pytest.mark.parametrize("kernel", ["flash", "cross"])
def test_triton_attention_both_kernels(dtype, D, kernel):
    backend("triton")
    from sdfast.kernels.attention import CROSS_MAX_BYTES, attention, cross_tile_bytes
    q, k, v = _qkv(1, 3, 777, 77, D, dtype)
    if kernel == "cross" and cross_tile_bytes(77, D, q.element_size()) > CROSS_MAX_BYTES:
        pytest.skip(f"D={D}, {dtype}: over the one-tile kernel's K/V budget (the launcher uses flash)")
    _check_attention(lambda *a: attention(*a, kernel=kernel), q, k, v)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wshape,ranks", [
    ((320, 768), [1, 4]),
    ((320, 320, 3, 3), [4]),
    ((640, 320, 1, 1), [1, 4]),
    ((96, 80), [128]),
])
def test_lora_merge(name, dtype, wshape, ranks):
    be = backend(name)
    conv = len(wshape) == 4
    w = rand(*wshape, dtype=dtype)
    ups = [rand(wshape[0], r, *((1, 1) if conv else ()), dtype=dtype, seed=10 + r) for r in ranks]
    downs = [rand(r, *wshape[1:], dtype=dtype, seed=20 + r) for r in ranks]
    scales = [0.75, -0.5][:len(ranks)]
    assert be.supports_lora_merge(w, ups, downs, scales) is True
    out = w.clone()
    assert be.lora_merge_(out, ups, downs, scales) is out
    ref32 = lora_merge_ref(w.float(), [u.float() for u in ups], [d.float() for d in downs], scales)
    ref_lowp = w.clone().reshape(wshape[0], -1)
    for u, d, s in zip(ups, downs, scales):
        ref_lowp += s * (u.reshape(wshape[0], -1) @ d.reshape(d.shape[0], -1))
    assert_earned(out, ref32, ref_lowp.reshape(wshape))
