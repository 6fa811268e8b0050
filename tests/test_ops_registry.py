"""The backend registry (sdfast.ops.registry) and the torch.library custom ops (sdfast.ops.custom):
forcing by argument, context manager and SDFAST_BACKEND; unavailable backends raise; constraints
are always checked; the ops trace under torch.compile and pass torch.library.opcheck;
gradients flow through the reference."""
import os
import subprocess
import sys

import pytest
import torch

from sdfast import SdfastError, ops
from sdfast.ops import registry

HAS_CPU = "cpu" in ops.backends("group_norm")


def _gn_args(c=64, dtype=torch.float32, hw=(5, 6)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, *hw, generator=g).to(dtype)
    w, b = torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype)
    return x, w, b


@pytest.fixture
def spy(monkeypatch):
    """A registered test backend that records its calls and refuses SiLU."""
    calls = []

    def no_silu(x, num_groups, weight, bias, eps, silu, add):
        return True if not silu else "spy does not fuse SiLU"

    def group_norm(x, num_groups, weight, bias, eps, silu, add):
        calls.append("group_norm")
        return ops.group_norm_ref(x, num_groups, weight, bias, eps, silu, add)

    monkeypatch.setitem(registry._IMPLS, "group_norm", dict(registry._IMPLS["group_norm"]))
    registry.register("group_norm", "spy", constraints=[no_silu])(group_norm)
    return calls


def test_backends_lists_reference_and_rejects_unknown_ops():
    for op in registry.OPS:
        names = ops.backends(op)
        assert "reference" in names and len(set(names)) == len(names)
    with pytest.raises(SdfastError, match="unknown op"):
        ops.backends("conv")


def test_forcing_by_argument_context_and_env(spy, monkeypatch):
    x, w, b = _gn_args()
    ops.group_norm(x, 32, w, b, backend="spy")
    assert spy == ["group_norm"]
    with ops.use_backend("spy"):
        ops.group_norm(x, 32, w, b)
        with ops.use_backend(group_norm="auto"):  # an inner block lifts the forcing
            ops.group_norm(x, 32, w, b)
    assert spy == ["group_norm"] * 2
    monkeypatch.setenv("SDFAST_BACKEND", "attention=reference,group_norm=spy")
    ops.group_norm(x, 32, w, b)
    assert spy == ["group_norm"] * 3
    with ops.use_backend(group_norm="reference"):  # the context manager beats the env var
        ops.group_norm(x, 32, w, b)
    assert spy == ["group_norm"] * 3
    assert registry.forced_backend("attention") == "reference"


def test_unavailable_backend_raises_with_reason(monkeypatch):
    x, w, b = _gn_args()
    with pytest.raises(SdfastError, match="'nope' is not available for group_norm"):
        ops.group_norm(x, 32, w, b, backend="nope")
    monkeypatch.setenv("SDFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="available: "):
        ops.attention(x[:, :4], x[:, :4], x[:, :4])
    monkeypatch.delenv("SDFAST_BACKEND")
    for name in ("cuda", "triton"):
        if name not in ops.backends("attention"):
            with pytest.raises(SdfastError, match=f"'{name}' is not available"):
                ops.attention(x[:, :4], x[:, :4], x[:, :4], backend=name)


def test_constraints_are_enforced(spy, monkeypatch):
    x, w, b = _gn_args()
    monkeypatch.setitem(registry.AUTO_ORDER, "cpu", ("spy", "cpu", "reference"))
    ops.group_norm(x, 32, w, b, silu=False)
    assert spy == ["group_norm"]  # chosen first where it can run
    ops.group_norm(x, 32, w, b, silu=True)
    assert spy == ["group_norm"]  # never chosen where its constraint refuses
    with pytest.raises(SdfastError, match="spy does not fuse SiLU"):
        ops.group_norm(x, 32, w, b, silu=True, backend="spy")


@pytest.mark.skipif(not HAS_CPU, reason="sdfast._C not built")
def test_auto_selection_by_device_dtype_and_speed():
    big = torch.randn(2, 64, 64, 64)        # above the threshold at any thread count
    w, b = torch.ones(64), torch.zeros(64)
    assert registry.select("group_norm", (big, 32, w, b, 1e-5, False, None))[0] == "cpu"
    # where bench/kernels.py measured the cpu kernel slower than torch, auto picks torch ...
    small = torch.randn(1, 64, 8, 8)
    assert registry.select("group_norm", (small, 32, w, b, 1e-5, False, None))[0] == "reference"
    assert ops.group_norm(small, 32, w, b, backend="cpu").shape == small.shape   # ... forcing works
    xh, wh, bh = _gn_args(dtype=torch.bfloat16)
    assert registry.select("group_norm", (xh, 32, wh, bh, 1e-5, False, None))[0] == "reference"
    with pytest.raises(SdfastError, match="float32"):
        ops.group_norm(xh, 32, wh, bh, backend="cpu")
    q = torch.randn(1, 2, 9, 8)
    assert registry.select("attention", (q, q, q))[0] == "cpu"             # one key block
    q = torch.randn(1, 2, 600, 8)
    # long self-attention: the AVX-512 kernel beats torch's SDPA at head dims up to 64, the
    # AVX2 one does not (cpu_backend.ATTN_MAX_HEAD_DIM_SELF, ATTN_MAX_KEYS_AVX2) ...
    from sdfast import _C
    long_self = "cpu" if _C.cpu_isa() == "avx512" else "reference"
    assert registry.select("attention", (q, q, q))[0] == long_self
    q = torch.randn(1, 2, 600, 64)
    assert registry.select("attention", (q, q, q))[0] == long_self
    # ... and at head dim 80 it is about even or behind torch's on self-attention, ahead on
    # cross-attention with up to two prompt chunks of keys (ATTN_MAX_HEAD_DIM)
    q, kv = torch.randn(1, 2, 600, 80), torch.randn(1, 2, 154, 80)
    assert registry.select("attention", (q, q, q))[0] == "reference"
    cross80 = "cpu" if _C.cpu_isa() == "avx512" else "reference"
    assert registry.select("attention", (q, kv, kv))[0] == cross80
    q = torch.randn(1, 2, 64, 160)
    assert registry.select("attention", (q, q, q))[0] == "reference"       # head dim 160
    wt = torch.zeros(8, 8)
    assert registry.select("lora_merge", (wt, [torch.zeros(8, 2)], [torch.zeros(2, 8)], [1.0]))[0] == "cpu"


def test_argument_checks_are_backend_independent():
    x, w, b = _gn_args()
    with pytest.raises(SdfastError, match="do not split into 5 groups"):
        ops.group_norm(x, 5, w, b)
    with pytest.raises(SdfastError, match="add has shape"):
        ops.group_norm(x, 32, w, b, add=torch.zeros(2, 3))
    with pytest.raises(SdfastError, match="attention takes"):
        ops.attention(x, x, x[0])
    with pytest.raises(SdfastError, match="does not give weight"):
        ops.lora_merge_(torch.zeros(4, 5), torch.zeros(4, 2), torch.zeros(3, 5), 1.0)


def test_outputs_have_fixed_layouts():
    x, w, b = _gn_args()
    xcl = x.contiguous(memory_format=torch.channels_last)
    for backend in ops.backends("group_norm"):
        assert ops.group_norm(xcl, 32, w, b, backend=backend).stride() == xcl.stride()
    q = torch.randn(2, 3, 10, 8)
    for backend in ops.backends("attention"):
        out = ops.attention(q, q, q, backend=backend)
        assert out.transpose(1, 2).is_contiguous()  # [B, N, heads, D] memory


def _opcheck_cases(backend):
    x, w, b = _gn_args()
    add = torch.randn(2, 64)
    q, k = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 5, 8)
    weight = torch.randn(6, 4, 3, 3)
    return [
        (torch.ops.sdfast.group_norm.default, (x, 32, w, b, 1e-5, True, add, backend)),
        (torch.ops.sdfast.attention.default, (q, k, k.clone(), backend)),
        (torch.ops.sdfast.lora_merge.default,
         (weight, [torch.randn(6, 2, 1, 1)], [torch.randn(2, 4, 3, 3)], [0.5], backend)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_custom_ops_pass_opcheck(backend):
    if backend not in ops.backends("attention"):
        pytest.skip(f"{backend} not available")
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not HAS_CPU, reason="sdfast._C not built")
def test_ops_trace_under_torch_compile_fullgraph():
    def block(x, w, b, emb, q, k, v):
        y = ops.group_norm(x, 32, w, b, silu=True, add=emb)
        return y.mean() + ops.attention(q, k, v).sum()

    x, w, b = _gn_args()
    emb, q, k = torch.randn(2, 64), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 5, 8)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with ops.use_backend("cpu"):
        got = compiled(x, w, b, emb, q, k, k)
    torch.testing.assert_close(got, block(x, w, b, emb, q, k, k), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_reference():
    x, w, b = _gn_args()
    add = torch.randn(2, 64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, add)]
    ops.group_norm(leaves[0], 32, leaves[1], leaves[2], silu=True, add=leaves[3]).square().sum().backward()
    refs = [t.clone().requires_grad_() for t in (x, w, b, add)]
    ops.group_norm_ref(refs[0], 32, refs[1], refs[2], 1e-5, True, refs[3]).square().sum().backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    q, k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))
    ops.attention(q, k, v).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ops.attention_ref(q2, k2, v2).sum().backward()
    for got, want in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_eager_calls_equal_the_custom_ops_which_dispatch_modes_still_see():
    """Plain eager calls skip the dispatcher (same body, same output); tracing, a dispatch mode
    or autograd (test_gradients_flow_through_the_reference) get the custom op itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, b = _gn_args()
    q = torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        direct = ops.group_norm(x.contiguous(memory_format=torch.channels_last), 32, w, b, silu=True)
        via_op = torch.ops.sdfast.group_norm(x.contiguous(memory_format=torch.channels_last), 32, w, b,
                                             1e-5, True, None, "")
        assert torch.equal(direct, via_op) and direct.stride() == via_op.stride()
        assert torch.equal(ops.attention(q, q, q), torch.ops.sdfast.attention(q, q, q, ""))

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        ops.group_norm(x, 32, w, b, silu=True)
        ops.attention(q, q, q)
        ops.lora_merge_(torch.zeros(8, 8), torch.zeros(8, 2), torch.zeros(2, 8), 1.0)
    assert {"sdfast.group_norm.default", "sdfast.attention.default",
            "sdfast.lora_merge.default"} <= set(seen)


@pytest.mark.skipif(not HAS_CPU, reason="sdfast._C not built")
def test_cpu_kernels_instruction_set_can_be_forced():
    import os

    from sdfast.ops import cpu_backend
    _C = cpu_backend._C
    assert _C.cpu_isa_available("avx2") and _C.cpu_isa() in ("avx2", "avx512")
    assert not _C.set_cpu_isa("avx1024") and not _C.cpu_isa_available("sse2")
    code = "from sdfast import _C; print(_C.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SDFAST_CPU_ISA": "avx2"})
    assert out.returncode == 0 and out.stdout.strip() == "avx2", out.stderr


def test_import_without_native_module_falls_back_to_reference():
    code = ("import sys; sys.modules['sdfast._C'] = None\n"
            "import torch, sdfast.ops as o\n"
            "print(o.backends('attention'))\n"
            "q = torch.randn(1, 1, 3, 8); print(tuple(o.attention(q, q, q).shape))\n"
            "from sdfast.ops import registry; print(registry.unavailable('cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "'cpu'" not in lines[0] and "'reference'" in lines[0]
    assert lines[1] == "(1, 1, 3, 8)" and "sdfast._C" in lines[2]


def test_a_misspelt_cpu_isa_setting_is_an_error_not_ignored():
    code = ("import torch, sdfast.ops as o\n"
            "try:\n"
            "    o.group_norm(torch.randn(2, 64, 4, 4), 32, None, None, backend='cpu')\n"
            "except o.SdfastError as e:\n"
            "    print('ERROR', e)\n")
    for value, expected in (("avx-512", "SDFAST_CPU_ISA=avx-512: expected avx2 or avx512"),
                            ("avx2", None)):
        env = dict(os.environ, SDFAST_CPU_ISA=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        if expected:
            assert out.stdout.startswith(f"ERROR {expected}"), out.stdout
        else:
            assert out.stdout == "", out.stdout
