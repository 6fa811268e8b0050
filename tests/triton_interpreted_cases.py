"""(Run by test_kernels_triton.py in a child process.) Parity of every Triton kernel with its pure-torch reference, under the Triton interpreter
(TRITON_INTERPRET=1, CPU tensors; see `_load_interpreted`). Tolerance is earned as in flash-attention's tests:
max|out - ref32| <= 2 * max|ref_lowp - ref32| + atol, refs computed in fp32 and in the input dtype.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _load_interpreted(name):
    """A private copy of kernels/<name>.py whose @triton.jit functions are interpreted.

    Triton decides interpreted-or-compiled when a kernel is decorated (and checks again at
    launch, hence the `_interpret` fixture), from TRITON_INTERPRET. Setting it only while these
    copies load and while this module's tests run keeps it out of the rest of the pytest
    session, where the registry would send CPU tensors to the slow interpreter and a GPU run
    would get interpreted kernels."""
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
        spec = importlib.util.spec_from_file_location(f"_interpreted_{name}", KERNELS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


_gn, _attn, _lora = (_load_interpreted(n) for n in ("group_norm", "attention", "lora_merge"))
group_norm, group_norm_ref = _gn.group_norm, _gn.group_norm_ref
attention, attention_ref = _attn.attention, _attn.attention_ref
lora_merge_, lora_merge_ref = _lora.lora_merge_, _lora.lora_merge_ref


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET when a kernel launches: set it per test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly (it hands numpy the raw
# 16-bit patterns): the bf16 attention kernels are checked on the GPU (tests/gpu) instead.
BF16_DOT_SKIP = "Triton interpreter: tl.dot on bf16 operands is wrong on CPU; covered by tests/gpu"


def assert_earned(out, ref32, ref_lowp):
    err = (out.float() - ref32).abs().max().item()
    budget = 2 * (ref_lowp.float() - ref32).abs().max().item() + ATOL[out.dtype]
    assert err <= budget, f"max error {err:.3g} > earned tolerance {budget:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups,layout", [
    ((2, 12, 5, 7), 3, "nchw"),
    ((2, 12, 5, 7), 3, "channels_last"),
    ((1, 16, 9, 11), 16, "channels_last"),
    ((3, 8, 37), 4, "bcn"),
])
@pytest.mark.parametrize("silu,with_add", [(False, False), (True, True)])
def test_group_norm(dtype, shape, groups, layout, silu, with_add):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w, b = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    add = torch.randn(shape[0], C, generator=g).to(dtype) if with_add else None
    out = group_norm(x, groups, w, b, eps=1e-5, silu=silu, add=add, block_s=16)  # several spatial tiles
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    ref32 = group_norm_ref(x.float(), groups, w.float(), b.float(), 1e-5, silu, f32(add))
    ref_lowp = group_norm_ref(x, groups, w, b, 1e-5, silu, add)
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
    assert_earned(out, ref32, ref_lowp)


@pytest.mark.parametrize("shape,layout", [
    ((2, 320, 7, 9), "nchw"),
    ((2, 640, 7, 9), "channels_last"),
    ((2, 1280, 7, 9), "nchw"),
    ((2, 1280, 1, 1), "channels_last"),
])
def test_group_norm_sd_channels(shape, layout):
    """The issue's channel counts with 32 groups (HW 1 and 7x9; 64x64 is too slow for the
    interpreter: tests/gpu and the cpu backend's tests run it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    w, b, add = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(shape[0], C, generator=g)
    out = group_norm(x, 32, w, b, eps=1e-5, silu=True, add=add)
    exact = group_norm_ref(x.double(), 32, w.double(), b.double(), 1e-5, True, add.double()).float()
    assert out.stride() == x.stride()
    assert_earned(out, exact, group_norm_ref(x, 32, w, b, 1e-5, True, add))  # fp32 earns the budget


def _qkv(B, H, N, M, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(dtype) for n in (N, M, M)]


def _check_attention(q, k, v, **kw):
    out = attention(q, k, v, **kw)
    ref32 = attention_ref(q.float(), k.float(), v.float())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_earned(out, ref32, attention_ref(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 80, 160])
@pytest.mark.parametrize("M", [77, 154])
def test_attention_cross(dtype, D, M):
    if dtype == torch.bfloat16:
        pytest.skip(BF16_DOT_SKIP)
    q, k, v = _qkv(1, 2, 19, M, D, dtype)
    if _attn.cross_tile_bytes(M, D, q.element_size()) > _attn.CROSS_MAX_BYTES:
        pytest.skip(f"M={M}, D={D}, {dtype}: over the one-tile kernel's K/V budget (uses flash)")
    _check_attention(q, k, v, kernel="cross", block_m=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 80, 160])
def test_attention_flash(dtype, D):
    if dtype == torch.bfloat16:
        pytest.skip(BF16_DOT_SKIP)
    q, k, v = _qkv(1, 2, 45, 45, D, dtype)  # 45: not a multiple of the 16-row tiles
    _check_attention(q, k, v, kernel="flash", block_m=16, block_n=16)


def test_attention_flash_cross_shapes_and_strides():
    """Flash kernel on a cross-attention shape (M != N), non-contiguous q (a transposed view)."""
    q, k, v = _qkv(2, 3, 21, 77, 40, torch.float32, seed=1)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, N, D] view of [B, N, H, D]
    _check_attention(q, k, v, kernel="flash", block_m=16, block_n=32)
    _check_attention(q, k, v)  # default pick: the one-tile kernel


def test_attention_pick_kernel():
    pick_kernel = _attn.pick_kernel
    assert pick_kernel(77, 40) == "cross" and pick_kernel(154, 80) == "cross"
    assert pick_kernel(77, 160) == "cross" and pick_kernel(77, 160, element_size=4) == "flash"
    assert pick_kernel(154, 160) == "flash" and pick_kernel(4096, 64) == "flash"
    q, k, v = _qkv(1, 1, 4, 154, 160, torch.float32)
    with pytest.raises(ValueError, match="one-tile"):
        attention(q, k, v, kernel="cross")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wshape,ranks", [
    ((37, 29), [1]),
    ((37, 29), [4, 1]),
    ((20, 6, 3, 3), [4]),
    ((20, 6, 3, 3), [1, 4]),
    ((33, 50), [128]),
])
def test_lora_merge(dtype, wshape, ranks):
    g = torch.Generator().manual_seed(0)
    conv = len(wshape) == 4
    w = torch.randn(wshape, generator=g).to(dtype)
    ups = [torch.randn(wshape[0], r, *((1, 1) if conv else ()), generator=g).to(dtype) for r in ranks]
    downs = [torch.randn(r, *wshape[1:], generator=g).to(dtype) for r in ranks]
    scales = [0.75, -0.5][:len(ranks)]
    out = w.clone()
    assert lora_merge_(out, ups, downs, scales, block_o=16, block_i=16) is out
    ref32 = lora_merge_ref(w.float(), [u.float() for u in ups], [d.float() for d in downs], scales)
    # the low-precision baseline is the naive merge in the input dtype, one update per LoRA
    ref_lowp = w.clone().reshape(wshape[0], -1)
    for u, d, s in zip(ups, downs, scales):
        ref_lowp += s * (u.reshape(wshape[0], -1) @ d.reshape(d.shape[0], -1))
    assert_earned(out, ref32, ref_lowp.reshape(wshape))


def test_lora_merge_rejects_mismatch():
    w = torch.zeros(8, 6)
    with pytest.raises(ValueError, match="do not fit"):
        lora_merge_(w, [torch.zeros(8, 2)], [torch.zeros(2, 5)], [1.0])


def test_backend_supports_and_runs(monkeypatch):
    from sdfast.ops import triton_backend
    monkeypatch.setattr(triton_backend, "_kernels", lambda: (_gn, _attn, _lora))
    assert triton_backend.available()
    x = torch.randn(2, 8, 4, 4)
    assert triton_backend.supports_group_norm(x, 4, None, None) is True
    assert "divisible" in triton_backend.supports_group_norm(x, 3, None, None)
    assert "dtype" in triton_backend.supports_group_norm(x.double(), 4, None, None)
    torch.testing.assert_close(triton_backend.group_norm(x, 4, None, None, 1e-5, True, None),
                               group_norm_ref(x, 4, None, None, 1e-5, True), atol=1e-5, rtol=0)
    q, k, v = _qkv(1, 1, 5, 7, 16, torch.float32)
    assert triton_backend.supports_attention(q, k, v) is True
    assert "head dim" in triton_backend.supports_attention(*_qkv(1, 1, 2, 2, 320, torch.float32))
    torch.testing.assert_close(triton_backend.attention(q, k, v), attention_ref(q, k, v),
                               atol=1e-5, rtol=0)
    w, up, down = torch.randn(6, 5), torch.randn(6, 2), torch.randn(2, 5)
    assert triton_backend.supports_lora_merge(w, [up], [down], [1.0]) is True
    assert "fit" in triton_backend.supports_lora_merge(w, [up], [down.t()], [1.0])
    expect = lora_merge_ref(w.clone(), [up], [down], [0.5])
    torch.testing.assert_close(triton_backend.lora_merge_(w, [up], [down], [0.5]), expect,
                               atol=1e-5, rtol=0)


def test_backend_rejects_cpu_without_interpreter(monkeypatch):
    from sdfast.ops import triton_backend
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 2, 2)
    reason = triton_backend.supports_group_norm(x, 2)
    assert reason is not True and ("CUDA" in reason or "interpreter" in reason)
