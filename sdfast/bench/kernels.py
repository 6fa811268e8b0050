"""Per-op kernels against torch at SD1.5 shapes: the cases of `sdfast bench --suite kernels`
and of bench/kernels.py (which times every backend of every op, not only the dispatched one).

A `Case` is one op at one shape: `baseline` is what torch offers for it, `run(backend)` the
sdfast op with that backend (None: the dispatch's own choice), `amount` the bytes or FLOPs one
call moves or computes, so that a time becomes a physical rate:

- group_norm (+SiLU, + the ResBlock's time-embedding add where marked): baseline `F.group_norm`
  then `F.silu` (and the `+` before it). Traffic counted as one read of x and one write of the
  output (what a fused kernel must move): GB/s = 2 * numel * itemsize / t.
- attention: baseline `F.scaled_dot_product_attention` on the same q, k, v, views of
  [B, N, heads * D] as the models make them. FLOPs = 4 * B * H * N * M * D (QK^T and PV, a
  multiply-add counted as 2).
- lora_merge: a rank-32 LoRA merged into every attention projection of the SD1.5 UNet (to_q,
  to_k, to_v, to_out.0 of its 16 transformer blocks), as one list call; baseline a per-layer
  `weight.addmm_(up, down, alpha=scale)` loop. GB/s = (read + write of every weight) / t.
  Its check runs the timed list call on copies and holds every merged weight to float64
  W + s * U @ D within the merge's rounding (`_lora_check`).
- conv2d: a 3x3 stride-1 padding-1 convolution C -> C on channels-last input (the UNet's
  ResBlock convs; sdfast's cpu backend runs them by Winograd F(4x4, 3x3)); baseline
  `F.conv2d`. FLOPs are the direct convolution's, 2 * outputs * C * 9, for Winograd too.

`sgemm` is the roofline the conv and attention rates are read against: a 2048^3 `torch.mm`.
Fast calls are timed `inner` at a time (`inner_count`: enough calls for `min_time` seconds of
the baseline), so a timer's resolution and a call's overhead do not dominate.
"""
import statistics
import time
from dataclasses import dataclass, field

from .measure import sync

HEADS = 8                      # SD1.5: 8 heads, head dim C / 8
LORA_RANK = 32
GB, TFLOP, GFLOP = ("GB/s", 1e9), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)


def sd15_levels(latent):
    """(channels, side) of the SD1.5 UNet's four levels for a `latent` x `latent` input."""
    return [(c, max(1, latent // f)) for c, f in ((320, 1), (640, 2), (1280, 4), (1280, 8))]


def attention_shapes(latent):
    """(queries, heads, head dim) of the transformer blocks (the first three levels)."""
    return [(side * side, HEADS, c // HEADS) for c, side in sd15_levels(latent)[:3]]


def sd15_attention_projections():
    """(out, in) of every attention projection of the SD1.5 UNet (to_q, to_k, to_v, to_out.0
    per transformer block; to_k/to_v of attn2 read the 768-wide text context)."""
    shapes = []
    for c, blocks in ((320, 2 + 3), (640, 2 + 3), (1280, 2 + 1 + 3)):  # down + mid + up blocks
        for _ in range(blocks):
            shapes += [(c, c)] * 4                   # attn1: q, k, v, out
            shapes += [(c, c), (c, 768), (c, 768), (c, c)]  # attn2: q, k, v, out
    return shapes


@dataclass
class Case:
    """One op at one shape; see the module docstring."""

    op: str                    # "group_norm+silu", "attention (cross)", ...
    describe: dict             # shape, layout, dtype, the baseline's name
    baseline: object           # () -> output
    run: object                # backend name or None -> (() -> output)
    amount: float              # bytes or FLOPs of one call
    unit: tuple                # ("GB/s", 1e9) or ("TFLOP/s", 1e12)
    slow: bool = False         # seconds per call on a CPU: fewer rounds in bench/kernels.py
    extras: dict = field(default_factory=dict)   # more contenders bench/kernels.py times
    check: object = None       # () -> (sdfast's output, torch's); None: (run(None)(), baseline())
    note: str = ""             # how to read its figures

    def outputs(self):
        return self.check() if self.check else (self.run(None)(), self.baseline())

    def rate(self, seconds):
        return self.amount / seconds / self.unit[1]

    def label(self):
        shape = self.describe.get("shape")
        if isinstance(shape, dict):
            shape = " ".join(f"{k}={v}" for k, v in shape.items())
        return " ".join(str(p) for p in (self.op, self.describe.get("layout"), shape) if p)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def group_norm_cases(shapes, rows, device, dtype, layouts=("nchw", "nhwc"), adds=(False,)):
    import torch
    import torch.nn.functional as F

    from .. import ops

    cases = []
    for c, side in shapes:
        for layout in layouts:
            for add in adds:
                x = torch.randn(rows, c, side, side, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.contiguous(memory_format=torch.channels_last)
                weight = torch.randn(c, device=device, dtype=dtype)
                bias = torch.randn(c, device=device, dtype=dtype)
                emb = torch.randn(rows, c, device=device, dtype=dtype) if add else None

                def baseline(x=x, weight=weight, bias=bias, emb=emb):
                    y = x + emb[:, :, None, None] if emb is not None else x
                    return F.silu(F.group_norm(y, 32, weight, bias, 1e-5))

                def run(backend, x=x, weight=weight, bias=bias, emb=emb):
                    return lambda: ops.group_norm(x, 32, weight, bias, 1e-5, silu=True, add=emb,
                                                  backend=backend)

                cases.append(Case("group_norm+silu" + ("+add" if add else ""),
                                  {"layout": layout, "shape": [rows, c, side, side],
                                   "dtype": _dtype_name(dtype),
                                   "baseline": "F.group_norm + F.silu" + (" (+ add)" if add else "")},
                                  baseline, run, 2 * x.numel() * x.element_size(), GB))
    return cases


def _heads(n, heads, d, rows, device, dtype):
    """[rows, heads, n, d] as the models make it: a view of [rows, n, heads * d]."""
    import torch

    t = torch.randn(rows, n, heads * d, device=device, dtype=dtype)
    return t.view(rows, n, heads, d).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]


def attention_cases(shapes, rows, device, dtype, kinds=("cross", "self")):
    import torch.nn.functional as F

    from .. import ops

    cases = []
    for n, heads, d in shapes:
        for kind in kinds:
            m = 77 if kind == "cross" else n
            q, k, v = (_heads(length, heads, d, rows, device, dtype) for length in (n, m, m))
            cases.append(Case(
                f"attention ({kind})",
                {"shape": {"B": rows, "H": heads, "N": n, "M": m, "D": d},
                 "dtype": _dtype_name(dtype), "baseline": "F.scaled_dot_product_attention"},
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                lambda backend, q=q, k=k, v=v: lambda: ops.attention(q, k, v, backend=backend),
                4 * rows * heads * n * m * d, TFLOP,
                slow=str(device) == "cpu" and kind == "self" and n * m > 2 ** 21))
    return cases


def lora_merge_case(device, dtype, shapes=None, rank=LORA_RANK, per_layer_backends=()):
    """The list merge; `per_layer_backends` adds, for bench/kernels.py, each of those backends
    called once per layer, and the memory floor (`w.mul_(1)` on every weight)."""
    import torch

    from .. import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = shapes or sd15_attention_projections()
    weights = [torch.randn(o, i, generator=g).to(device, dtype) for o, i in shapes]
    ups = [torch.randn(o, rank, generator=g).to(device, dtype) for o, i in shapes]
    downs = [torch.randn(rank, i, generator=g).to(device, dtype) for o, i in shapes]
    scale = 1e-4
    scales = [scale] * len(shapes)

    def baseline():
        for w, u, d in zip(weights, ups, downs):
            w.addmm_(u, d, alpha=scale)

    def run(backend):
        return lambda: ops.lora_merge_(weights, ups, downs, scales, backend=backend)

    def per_layer(backend):
        return lambda: [ops.lora_merge_(w, u, d, scale, backend=backend)
                        for w, u, d in zip(weights, ups, downs)]

    def floor():
        for w in weights:
            w.mul_(1.0)

    extras = {f"{name} (per-layer calls)": per_layer(name) for name in per_layer_backends}
    if per_layer_backends:
        extras["memory floor (w.mul_(1) per layer)"] = floor
    case = Case(f"lora_merge (rank {rank}, {len(shapes)} SD1.5 attention projections)",
                {"dtype": _dtype_name(dtype), "baseline": "per-layer weight.addmm_"},
                baseline, run, 2 * sum(w.numel() * w.element_size() for w in weights), GB,
                extras=extras, check=lambda: _lora_check(weights, ups, downs, scales))
    return case


def _lora_check(weights, ups, downs, scales):
    """The timed call (the list form, the dispatch's backend) on copies of every weight (the
    merge is in place), each merged weight against W + s * U @ D in float64. Raises when any
    element is off by more than the rounding of an fp32-accumulated merge: gamma_n (n = rank + 3:
    the scale's rounding to fp32, the scale's and the rank products, the rank - 1 sums, the add
    to W) of |W| + |s| |U| @ |D|, plus one rounding to the weight's dtype (Higham, ch. 3). That
    is a few fp32 ulps of |W|, far below the LoRA's own change (at scale 1e-4, ~5e-4 against
    ulps of ~1e-7): a merge 1% off in scale, or a missing layer, fails. Returns (sdfast's merged
    weight, the float64 one) of the layer with the largest difference, for the report."""
    import torch

    from .. import ops

    ours = [w.clone() for w in weights]
    ops.lora_merge_(ours, ups, downs, scales)
    u32 = torch.finfo(torch.float32).eps / 2
    worst = None
    for k, (w, out, u, d, s) in enumerate(zip(weights, ours, ups, downs, scales)):
        n = u.shape[1] + 3
        gamma = n * u32 / (1 - n * u32)
        u64, d64 = u.double(), d.double()
        ref = w.double() + s * (u64 @ d64)
        bound = (gamma * (w.double().abs() + abs(s) * (u64.abs() @ d64.abs()))
                 + torch.finfo(w.dtype).eps / 2 * ref.abs())
        err = (out.double() - ref).abs()
        if not bool((err <= bound).all()):  # negated: NaN fails too
            raise RuntimeError(
                f"lora_merge check: layer {k} {tuple(w.shape)} is not W + s * U @ D: max error "
                f"{float(err.max()):.3g}, {int((~(err <= bound)).sum())} elements over the "
                f"rounding bound (at most {float(bound.max()):.3g})")
        diff = float(err.max())
        if worst is None or diff > worst[0]:
            worst = (diff, out, ref)
    return worst[1], worst[2]


def conv_cases(levels, rows, device, dtype):
    import torch
    import torch.nn.functional as F

    from .. import ops

    cases = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for c, side in levels:
        x = torch.randn(rows, c, side, side, generator=g).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5)).to(device, dtype)
        bias = torch.randn(c, generator=g).to(device, dtype)
        cases.append(Case(
            "conv2d 3x3", {"layout": "nhwc", "shape": [rows, c, side, side],
                           "dtype": _dtype_name(dtype), "baseline": "F.conv2d"},
            lambda x=x, w=weight, b=bias: F.conv2d(x, w, b, 1, 1),
            lambda backend, x=x, w=weight, b=bias: lambda: ops.conv2d(x, w, b, 1, 1, backend=backend),
            2 * x.numel() * c * 9, TFLOP,
            note="conv2d FLOPs are the direct convolution's (Winograd multiplies less), so a "
                 "share of the GEMM roofline can exceed 100%"))
    return cases


def sgemm(device, dtype, n=2048):
    """`(call, FLOPs)` of an n x n x n `torch.mm`: the machine's GEMM roofline."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n ** 3


def sgemm_gflops(clock=time.perf_counter, n=2048, repeats=5, device="cpu"):
    """GFLOP/s of an fp32 n^3 `torch.mm` (median of `repeats` calls after one warm-up)."""
    import torch

    call, flops = sgemm(device, torch.float32, n)
    call()
    times = []
    for _ in range(repeats):
        sync(device)
        start = clock()
        call()
        sync(device)
        times.append(clock() - start)
    return flops / statistics.median(times) / 1e9


def inner_count(fn, device, min_time=0.05, clock=time.perf_counter):
    """Calls of `fn` (warmed up twice) that take at least `min_time` seconds together."""
    fn()
    fn()
    sync(device)
    start = clock()
    fn()
    sync(device)
    return max(1, int(min_time / max(clock() - start, 1e-6)))


def per_call(fn, inner, device, clock=time.perf_counter):
    """A runner: seconds per call of `fn`, over `inner` calls."""
    def run():
        sync(device)
        start = clock()
        for _ in range(inner):
            fn()
        sync(device)
        return (clock() - start) / inner
    return run


def interleaved(fns, device, rounds, min_time=0.05, clock=time.perf_counter):
    """{name: (median seconds per call, median per-round speed-up over the first fn)} for the
    callables in `fns` (the first is the baseline), in `rounds` rounds of `inner` calls each
    (`inner_count` of the baseline), in an order rotated every round."""
    from .measure import interleave

    names = list(fns)
    for name in names[1:]:                  # warm-up (and first touch of outputs)
        fns[name]()
        fns[name]()
    inner = inner_count(fns[names[0]], device, min_time, clock)
    times = interleave({n: per_call(fns[n], inner, device, clock) for n in names}, rounds, 0)
    base = times[names[0]]
    return {name: (statistics.median(t), statistics.median(b / x for b, x in zip(base, t)))
            for name, t in times.items()}
