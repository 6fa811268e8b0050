"""sdfast's ops as torch.library custom ops, so torch.compile and CUDA graphs see one opaque
node per op (with a fake implementation for tracing) instead of a Python registry.

    torch.ops.sdfast.group_norm(x, num_groups, weight, bias, eps, silu, add, backend) -> Tensor
    torch.ops.sdfast.attention(q, k, v, backend) -> Tensor
    torch.ops.sdfast.lora_merge(weight, ups, downs, scales, backend) -> None   (mutates weight)
    torch.ops.sdfast.conv2d(x, weight, bias, stride, padding, add, backend) -> Tensor

`backend` is a name, or "" for the registry's choice; the choice (forcing included) is made
when the op runs, on the real tensors. Output layouts are fixed here, whatever the backend
returns: group_norm's output has x's layout (`empty_like`), attention's is [B, N, H, D] memory
viewed as [B, H, N, D], conv2d's is channels-last when x is (as F.conv2d's), else contiguous. Gradients flow through the reference (recomputed in backward), so a
fused forward never changes what training computes.

Each op's body is a plain function (`run_group_norm`, `run_attention`, `run_lora_merge`,
`run_lora_merge_layers` for several weights at once, and `run_conv2d`).
`eager(*tensors)` says when calling it directly is indistinguishable from calling the op (no
compiling or tracing, no dispatch mode or tensor subclass to see the op, no autograd to
record): sdfast.ops then skips the dispatcher's ~20 us per call.
"""
from typing import Optional

import torch

from . import registry
from .reference import attention_ref, conv2d_ref, group_norm_ref


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors):
    """Whether an op's body may run directly on these arguments (None entries allowed)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


def _same_layout(out, like_shape, like_stride):
    return out.shape == like_shape and all(
        s1 == s2 for n, s1, s2 in zip(like_shape, out.stride(), like_stride) if n > 1)


def _in_x_layout(out, x):
    """`out` laid out as `torch.empty_like(x)` (copied only when it is not already)."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if dense and _same_layout(out, x.shape, x.stride()):
        return out
    like = torch.empty_like(x)
    return out if _same_layout(out, like.shape, like.stride()) else like.copy_(out)


def _attention_out(q, v):
    b, h, n, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)  # [B, N, H, Dv] -> [B, H, N, Dv]


# --- group_norm ----------------------------------------------------------------------------

def run_group_norm(x, num_groups, weight, bias, eps, silu, add, backend):
    args = (x, num_groups, weight, bias, eps, silu, add)
    _, fn = registry.select("group_norm", args, backend or None)
    out = fn(*args)
    if out.data_ptr() == x.data_ptr():  # a custom op's output may not alias an input
        out = out.clone()
    return _in_x_layout(out, x)


@torch.library.custom_op("sdfast::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, silu: bool, add: torch.Tensor | None,
                  backend: str) -> torch.Tensor:
    return run_group_norm(x, num_groups, weight, bias, eps, silu, add, backend)


@group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, add, backend):
    return torch.empty_like(x)


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, add, _ = inputs
    ctx.save_for_backward(x, weight, bias, add)
    ctx.num_groups, ctx.eps, ctx.silu = num_groups, eps, silu


def _reference_grads(ref, saved, needs, grad):
    """The gradients `grad` gives the tensors `saved` through `ref(*saved)` (the reference,
    recomputed), None for those that need none (`needs`) or are None."""
    leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
    with torch.enable_grad():
        out = ref(*leaves)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def _group_norm_backward(ctx, grad):
    needs = ctx.needs_input_grad
    gx, gw, gb, ga = _reference_grads(
        lambda x, w, b, a: group_norm_ref(x, ctx.num_groups, w, b, ctx.eps, ctx.silu, a),
        ctx.saved_tensors, (needs[0], needs[2], needs[3], needs[6]), grad)
    return gx, None, gw, gb, None, None, ga, None


torch.library.register_autograd("sdfast::group_norm", _group_norm_backward,
                                setup_context=_group_norm_setup)


# --- attention -----------------------------------------------------------------------------

def run_attention(q, k, v, backend):
    _, fn = registry.select("attention", (q, k, v), backend or None)
    out = fn(q, k, v)
    if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()):
        out = out.clone()
    b, h, n, _ = q.shape
    shape, stride = (b, h, n, v.shape[-1]), (n * h * v.shape[-1], v.shape[-1], h * v.shape[-1], 1)
    if _same_layout(out, shape, stride):  # [B, N, H, Dv] memory
        return out
    return _attention_out(q, v).copy_(out)


@torch.library.custom_op("sdfast::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return run_attention(q, k, v, backend)


@attention_op.register_fake
def _(q, k, v, backend):
    return _attention_out(q, v)


def _attention_setup(ctx, inputs, output):
    q, k, v, _ = inputs
    ctx.save_for_backward(q, k, v)


def _attention_backward(ctx, grad):
    gq, gk, gv = _reference_grads(attention_ref, ctx.saved_tensors, ctx.needs_input_grad[:3], grad)
    return gq, gk, gv, None


torch.library.register_autograd("sdfast::attention", _attention_backward,
                                setup_context=_attention_setup)


# --- lora_merge ----------------------------------------------------------------------------

def run_lora_merge(weight, ups, downs, scales, backend, base=None):
    args = (weight, list(ups), list(downs), list(scales), base)
    _, fn = registry.select("lora_merge", args, backend or None)
    fn(*args)


def run_lora_merge_layers(calls, backend):
    """Several weights' merges: `calls` a list of (weight, ups, downs, scales, base)."""
    registry.run_many("lora_merge", [(w, list(u), list(d), list(s), b) for w, u, d, s, b in calls],
                      backend or None)


@torch.library.custom_op("sdfast::lora_merge", mutates_args=("weight",))
def lora_merge_op(weight: torch.Tensor, ups: list[torch.Tensor], downs: list[torch.Tensor],
                  scales: list[float], backend: str, base: Optional[torch.Tensor] = None) -> None:
    run_lora_merge(weight, ups, downs, scales, backend, base)


@lora_merge_op.register_fake
def _(weight, ups, downs, scales, backend, base=None):
    return None


# --- conv2d --------------------------------------------------------------------------------

def _conv_format(x):
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _conv_out(x, weight, stride, padding):
    """An empty output of F.conv2d's shape, in x's memory format (as F.conv2d chooses it)."""
    b, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    size = (b, weight.shape[0], (h + 2 * padding[0] - kh) // stride[0] + 1,
            (w + 2 * padding[1] - kw) // stride[1] + 1)
    return torch.empty(size, dtype=x.dtype, device=x.device, memory_format=_conv_format(x))


def run_conv2d(x, weight, bias, stride, padding, add, backend):
    args = (x, weight, bias, stride, padding, add)
    _, fn = registry.select("conv2d", args, backend or None)
    out = fn(*args)
    if out.data_ptr() in (x.data_ptr(), 0 if add is None else add.data_ptr()):
        out = out.clone()
    fmt = _conv_format(x)
    return out if out.is_contiguous(memory_format=fmt) else out.contiguous(memory_format=fmt)


@torch.library.custom_op("sdfast::conv2d", mutates_args=())
def conv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
              padding: list[int], add: torch.Tensor | None, backend: str) -> torch.Tensor:
    return run_conv2d(x, weight, bias, stride, padding, add, backend)


@conv2d_op.register_fake
def _(x, weight, bias, stride, padding, add, backend):
    return _conv_out(x, weight, stride, padding)


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, add, _ = inputs
    ctx.save_for_backward(x, weight, bias, add)
    ctx.stride, ctx.padding = stride, padding


def _conv2d_backward(ctx, grad):
    needs = ctx.needs_input_grad
    gx, gw, gb, ga = _reference_grads(
        lambda x, w, b, a: conv2d_ref(x, w, b, ctx.stride, ctx.padding, a),
        ctx.saved_tensors, (needs[0], needs[1], needs[2], needs[5]), grad)
    return gx, gw, gb, None, None, ga, None


torch.library.register_autograd("sdfast::conv2d", _conv2d_backward, setup_context=_conv2d_setup)
