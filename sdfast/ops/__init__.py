"""The one dispatch layer for sdfast's fused ops.

Models call these functions, never a kernel directly. Today every op runs on the pure-torch
reference backend; the kernels issue adds cpu / triton / cuda backends behind the same names.
"""
from .reference import attention_ref, group_norm_ref

__all__ = ["group_norm", "attention", "backends"]

_BACKENDS = {"group_norm": ["reference"], "attention": ["reference"]}


def _check_backend(op, backend):
    if backend not in (None, "reference"):
        raise ValueError(f"backend {backend!r} is not available for {op} here; "
                         f"available: {', '.join(_BACKENDS[op])}")


def backends(op):
    """The backends available on this machine for `op`."""
    if op not in _BACKENDS:
        raise ValueError(f"unknown op {op!r}; ops: {', '.join(sorted(_BACKENDS))}")
    return list(_BACKENDS[op])


def group_norm(x, num_groups, weight, bias, eps=1e-5, silu=False, add=None, backend=None):
    """GroupNorm over `[B, C, *]`, optionally with `add` (`[B, C]`) added before the norm
    and SiLU applied after it."""
    _check_backend("group_norm", backend)
    return group_norm_ref(x, num_groups, weight, bias, eps=eps, silu=silu, add=add)


def attention(q, k, v, backend=None):
    """Softmax attention of `[B, heads, N, D]` queries against `[B, heads, M, D]` keys and
    values with scale 1/sqrt(D)."""
    _check_backend("attention", backend)
    return attention_ref(q, k, v)
