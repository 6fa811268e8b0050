"""The one backend registry of sdfast's ops.

A backend implements an op as a plain function with the op's signature:

    group_norm(x, num_groups, weight, bias, eps, silu, add) -> Tensor
    attention(q, k, v) -> Tensor
    lora_merge_(weight, ups, downs, scales, base=None) -> weight (lists; in place, or base + the LoRAs)
    conv2d(x, weight, bias, stride, padding, add) -> Tensor    (F.conv2d(...) + add)

registered with `@register(op, backend, constraints=[...])`. A constraint is called with the
op's arguments and returns True, or a string saying why the backend cannot run them (False
reads as "unsupported"). Constraints are always checked: a backend is never chosen for a case
it does not support, and forcing it there raises with its reason.

The built-in backends live in modules imported lazily, on first use, and guarded (a module
that fails to import makes its backend unavailable and never breaks `import sdfast`):

    reference  sdfast.ops.reference      pure torch; always available; the definition of correct
    cpu        sdfast.ops.cpu_backend    csrc/cpu through sdfast._C (OpenMP + AVX2)
    triton     sdfast.ops.triton_backend kernels/ (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    cuda       sdfast.ops.cuda_backend   csrc/cuda through sdfast._C_cuda

Each module defines `available() -> bool`, the op functions and `supports_<op>(...)`, and may
define `faster_<op>(...) -> bool`: whether it beats the next backend for these arguments, as
measured by bench/kernels.py. Automatic selection skips a backend where that is False (forcing
it still works): the fastest correct backend, not merely the first. A module may also define
a batched form of an op (`lora_merge_layers_(layers)`, layers a list of argument tuples) that
`run_many` calls instead of one call per tuple.

Selection: a forced backend wins (the op's `backend=` argument, then `use_backend(...)`, then
the SDFAST_BACKEND environment variable); otherwise the first backend of `AUTO_ORDER[device]`
that is available and supports the arguments. The reference supports everything, so
automatic selection never fails.
"""
import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass, field

from sdfast.errors import SdfastError

OPS = ("group_norm", "attention", "lora_merge", "conv2d")
BACKENDS = ("reference", "cpu", "triton", "cuda")
# The fastest first, per device type of the op's first tensor. Triton on CPU tensors runs its
# interpreter (a test tool, not a speed-up), so it is chosen there only when forced.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
ENV_VAR = "SDFAST_BACKEND"

_MODULES = {
    "reference": "sdfast.ops.reference",
    "cpu": "sdfast.ops.cpu_backend",
    "triton": "sdfast.ops.triton_backend",
    "cuda": "sdfast.ops.cuda_backend",
}
# The function each backend module defines for an op, and its optional batched form.
_FUNCTION = {"group_norm": "group_norm", "attention": "attention", "lora_merge": "lora_merge_",
             "conv2d": "conv2d"}
_MANY = {"lora_merge": "lora_merge_layers_"}


@dataclass
class Impl:
    """One backend's implementation of one op."""

    fn: object
    constraints: list = field(default_factory=list)
    faster: object = None     # automatic selection only: `faster(*args)` False -> skip it here
    many: object = None       # `many(list of argument tuples)`: fn on each, in one call

    def reason(self, args):
        """None when every constraint accepts `args`, else the first refusal's reason."""
        for check in self.constraints:
            ok = check(*args)
            if ok is True:
                continue
            return ok if isinstance(ok, str) and ok else f"{getattr(check, '__name__', check)} refused"
        return None


_IMPLS = {op: {} for op in OPS}
_UNAVAILABLE = {}  # backend -> why it cannot be loaded here
_LOADED = set()
_FORCED = contextvars.ContextVar("sdfast_forced_backend", default=None)


def _check_op(op):
    if op not in OPS:
        raise SdfastError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def register(op, backend, constraints=()):
    """Decorator: register `fn` as `backend`'s implementation of `op`."""
    _check_op(op)

    def deco(fn):
        _IMPLS[op][backend] = Impl(fn, list(constraints))
        return fn

    return deco


def _load(backend):
    """Import a built-in backend's module once and register its ops (or record why not)."""
    if backend in _LOADED or backend not in _MODULES:
        return
    _LOADED.add(backend)
    try:
        mod = importlib.import_module(_MODULES[backend])
        if backend != "reference" and not mod.available():
            why = getattr(mod, "unavailable_reason", None)
            _UNAVAILABLE[backend] = why() if callable(why) else "its available() is False here"
            return
    except SdfastError:       # the user's setting for it is wrong: said, and said again
        _LOADED.discard(backend)
        raise
    except Exception as err:  # a broken optional backend must never break sdfast
        _UNAVAILABLE[backend] = f"{_MODULES[backend]} failed to import ({type(err).__name__}: {err})"
        return
    if backend == "reference":
        register("group_norm", backend)(mod.group_norm_ref)
        register("attention", backend)(mod.attention_ref)
        register("lora_merge", backend)(mod.lora_merge_ref)
        register("conv2d", backend)(mod.conv2d_ref)
        return
    for op in OPS:
        fn = getattr(mod, _FUNCTION[op], None)
        if fn is None:
            continue
        check = getattr(mod, f"supports_{op}", None)
        register(op, backend, constraints=[check] if check else [])(fn)
        _IMPLS[op][backend].faster = getattr(mod, f"faster_{op}", None)
        _IMPLS[op][backend].many = getattr(mod, _MANY.get(op, ""), None)


def _impl(op, backend):
    _load(backend)
    return _IMPLS[op].get(backend)


def backends(op):
    """The backends available on this machine for `op`: the built-ins fastest first
    (cuda, triton, cpu, reference), then any others registered."""
    _check_op(op)
    for name in BACKENDS:
        _load(name)
    order = ["cuda", "triton", "cpu", "reference"] + sorted(_IMPLS[op])
    return [name for i, name in enumerate(order) if name in _IMPLS[op] and name not in order[:i]]


def unavailable(backend):
    """Why `backend` cannot be used here (None if it can, or is not a built-in)."""
    _load(backend)
    return _UNAVAILABLE.get(backend)


def _parse_forcing(spec, source):
    """'cpu' -> {'*': 'cpu'}; 'attention=cpu,group_norm=reference' -> per op."""
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            op, _, name = part.rpartition("=")
            items.append((op.strip() or "*", name.strip()))
    out = {}
    for op, name in items:
        if op != "*":
            _check_op(op)
        if name not in ("auto", ""):
            out[op] = name
    if not out and spec not in ("", "auto"):
        raise SdfastError(f"{source}: cannot read backend forcing {spec!r}")
    return out


def forced_backend(op):
    """The backend forced for `op` by `use_backend` or SDFAST_BACKEND (None: automatic)."""
    ctx = _FORCED.get()
    if ctx is not None:
        if op in ctx or "*" in ctx:
            return ctx.get(op, ctx.get("*"))
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        rules = _parse_forcing(env, ENV_VAR)
        return rules.get(op, rules.get("*"))
    return None


@contextlib.contextmanager
def use_backend(backend=None, **per_op):
    """Force a backend inside a `with` block: `use_backend("cpu")` for every op,
    `use_backend(attention="reference")` for one; "auto" lifts an outer forcing."""
    rules = {}
    if backend is not None:
        rules["*"] = backend
    rules.update(per_op)
    for op in per_op:
        _check_op(op)
    token = _FORCED.set(rules)
    try:
        yield
    finally:
        _FORCED.reset(token)


def select(op, args, backend=None):
    """(name, fn) of the backend that runs `op` on `args` (the op's positional arguments)."""
    _check_op(op)
    name = backend or forced_backend(op)
    if name == "auto":
        name = None
    if name is not None:
        impl = _impl(op, name)
        if impl is None:
            why = _UNAVAILABLE.get(name) or ("no such backend" if name not in BACKENDS
                                             else f"it does not implement {op}")
            raise SdfastError(f"backend {name!r} is not available for {op} here: {why}; "
                              f"available: {', '.join(backends(op))}")
        reason = impl.reason(args)
        if reason is not None:
            raise SdfastError(f"backend {name!r} cannot run this {op}: {reason}")
        return name, impl.fn
    device = _first_tensor(args).device.type
    for name in AUTO_ORDER.get(device, ("reference",)):
        impl = _impl(op, name)
        if impl is None or (impl.faster is not None and not impl.faster(*args)):
            continue
        if impl.reason(args) is None:
            return name, impl.fn
    impl = _impl(op, "reference")
    return "reference", impl.fn


def run_many(op, calls, backend=None):
    """Run `op` on every argument tuple of `calls`, each on the backend `select` picks for it;
    the calls of a backend with a batched form (`Impl.many`) go to it in one call."""
    groups = {}
    for args in calls:
        name, _ = select(op, args, backend)
        groups.setdefault(name, []).append(args)
    for name, group in groups.items():
        impl = _impl(op, name)
        if impl.many is not None and len(group) > 1:
            impl.many(group)
        else:
            for args in group:
                impl.fn(*args)


def _first_tensor(args):
    for a in args:
        if hasattr(a, "device"):
            return a
    raise SdfastError("op called without a tensor argument")
