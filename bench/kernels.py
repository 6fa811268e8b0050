"""Kernel benchmarks: every backend of every op against the torch baseline timed in the same run.

    python bench/kernels.py [--device cpu|cuda] [--quick] [--threads N] [--rounds R]
                            [--clock wall|process] [--only OPS] [--out bench/results/kernels-cpu.json]

Not a test: it asserts nothing and its numbers depend on the machine. Each row times one case
(SD1.5 shapes) with the baseline the issue names, interleaved with it: every round runs the
baseline and each backend one after another (order rotated), so a change of machine load (a
shared CPU) hits them alike; a speed-up is the median over rounds of the per-round ratio, a
time the median per call. `--threads 1 --clock process` times CPU time instead of wall time:
one core's efficiency, blind to the time a busy machine takes the core away.

- group_norm (+SiLU, + the ResBlock's time-embedding add where marked): baseline torch's
  `F.group_norm` followed by `F.silu` (and the `+` before it). Traffic counted as one read of x
  and one write of the output (what a fused kernel must move): GB/s = 2 * numel * itemsize / t.
- attention: baseline `F.scaled_dot_product_attention` on the same q, k, v: views of
  [B, N, heads * D] as the models make them. FLOPs = 4 * B * H * N * M * D (QK^T and PV, a
  multiply-add counted as 2), TFLOP/s = FLOPs / t.
- lora_merge: a rank-32 LoRA merged into every attention projection of the SD1.5 UNet (to_q,
  to_k, to_v, to_out.0 of its 16 transformer blocks); baseline a per-layer
  `weight.addmm_(up, down, alpha=scale)` loop; each backend once with the whole list of weights
  (`lora_merge_(weights, ups, downs, scales)`) and once per layer; beside them, as the floor
  any in-place merge has, `w.mul_(1)` on every weight. GB/s = (read + write of every weight) / t.

The summary prints each backend's speed-up over the baseline and writes everything, with the
machine (its load average before and after, the CPU kernels' instruction set) and the torch
version, as JSON.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdfast import ops  # noqa: E402

# SD1.5 UNet at 512x512 (64x64 latents), batch 2 (CFG): (channels, height, width) of ResBlocks.
GN_SHAPES = [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)]
# Attention at the same sizes: (query length, heads, head dim); SD1.5 has 8 heads, head dim
# C / 8. Cross-attention keys: 77 tokens (one chunk); self-attention keys = queries.
ATTN_SHAPES = [(4096, 8, 40), (1024, 8, 80), (256, 8, 160)]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCKS["wall"]


def interleaved(fns, device, rounds, min_time=0.05):
    """{name: (median seconds per call, median per-round speed-up over the first fn)} for the
    callables in `fns` (the first is the baseline), timed in `rounds` rounds of `inner` calls
    each (at least `min_time` seconds for the baseline), in a rotated order every round."""
    names = list(fns)
    for name in names:  # warm-up (and first-touch of outputs)
        fns[name]()
        fns[name]()
    _sync(device)
    start = _clock()
    fns[names[0]]()
    _sync(device)
    inner = max(1, int(min_time / max(_clock() - start, 1e-6)))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _sync(device)
            start = _clock()
            for _ in range(inner):
                fns[name]()
            _sync(device)
            times[name].append((_clock() - start) / inner)
    base = times[names[0]]
    return {name: (statistics.median(t), statistics.median(b / x for b, x in zip(base, t)))
            for name, t in times.items()}


def _row(measured, base_name, unit, amount):
    """The baseline's fields and one entry per backend from `interleaved`'s result; `unit`
    ("GBps" or "TFLOPs") and `amount` (bytes or FLOPs) give the physical rate."""
    scale = 1e9 if unit == "GBps" else 1e12
    base_s = measured[base_name][0]
    row = {"baseline_s": base_s, f"baseline_{unit}": amount / base_s / scale, "backends": {}}
    for name, (t, speedup) in measured.items():
        if name != base_name:
            row["backends"][name] = {"s": t, unit: amount / t / scale, "speedup": speedup}
    return row


def _backends(op, device):
    """The non-reference backends that run this op on `device` here (the triton interpreter
    on CPU is a test tool, not a speed-up, so it is not timed)."""
    names = [b for b in ops.backends(op) if b != "reference"]
    if device == "cpu":
        names = [b for b in names if b == "cpu"]
    return ["reference", *names]


def bench_group_norm(device, dtype, rounds, quick):
    rows = []
    shapes = GN_SHAPES[:2] if quick else GN_SHAPES
    for c, h, w in shapes:
        for layout in ("nchw", "nhwc"):
            for add in (False, True):
                x = torch.randn(2, c, h, w, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.contiguous(memory_format=torch.channels_last)
                weight = torch.randn(c, device=device, dtype=dtype)
                bias = torch.randn(c, device=device, dtype=dtype)
                emb = torch.randn(2, c, device=device, dtype=dtype) if add else None

                def baseline():
                    y = x + emb[:, :, None, None] if add else x
                    return F.silu(F.group_norm(y, 32, weight, bias, 1e-5))

                fns = {"baseline": baseline}
                for name in _backends("group_norm", device):
                    fns[name] = (lambda name: lambda: ops.group_norm(  # noqa: E731
                        x, 32, weight, bias, 1e-5, silu=True, add=emb, backend=name))(name)
                row = {"op": "group_norm+silu" + ("+add" if add else ""), "layout": layout,
                       "shape": [2, c, h, w], "dtype": str(dtype).replace("torch.", ""),
                       "baseline": "F.group_norm + F.silu" + (" (+ add)" if add else "")}
                row.update(_row(interleaved(fns, device, rounds), "baseline", "GBps",
                                2 * x.numel() * x.element_size()))
                rows.append(row)
    return rows


def _heads(n, heads, d, device, dtype):
    """[2, heads, n, d] as the models make it: a view of [2, n, heads * d]."""
    t = torch.randn(2, n, heads * d, device=device, dtype=dtype)
    return t.view(2, n, heads, d).transpose(1, 2)  # [B, N, H*D] -> [B, H, N, D]


def bench_attention(device, dtype, rounds, quick):
    rows = []
    shapes = ATTN_SHAPES[:1] if quick else ATTN_SHAPES
    for n, heads, d in shapes:
        for kind, m in (("cross", 77), ("self", n)):
            if device == "cpu" and kind == "self" and n > 1024 and quick:
                continue
            q, k, v = (_heads(length, heads, d, device, dtype) for length in (n, m, m))
            fns = {"baseline": lambda: F.scaled_dot_product_attention(q, k, v)}
            for name in _backends("attention", device):
                fns[name] = (lambda name: lambda: ops.attention(q, k, v, backend=name))(name)
            row = {"op": f"attention ({kind})", "shape": {"B": 2, "H": heads, "N": n, "M": m, "D": d},
                   "dtype": str(dtype).replace("torch.", ""), "baseline": "F.scaled_dot_product_attention"}
            # self-attention at 64x64 runs for seconds on a CPU: fewer rounds there
            few = device == "cpu" and kind == "self" and n * m > 2 ** 21
            row.update(_row(interleaved(fns, device, max(3, rounds // 3) if few else rounds),
                            "baseline", "TFLOPs", 4 * 2 * heads * n * m * d))
            rows.append(row)
    return rows


def sd15_attention_projections():
    """(out, in) of every attention projection of the SD1.5 UNet (to_q, to_k, to_v, to_out.0
    per transformer block; to_k/to_v of attn2 read the 768-wide text context)."""
    shapes = []
    for c, blocks in ((320, 2 + 3), (640, 2 + 3), (1280, 2 + 1 + 3)):  # down + mid + up blocks
        for _ in range(blocks):
            shapes += [(c, c)] * 4                   # attn1: q, k, v, out
            shapes += [(c, c), (c, 768), (c, 768), (c, c)]  # attn2: q, k, v, out
    return shapes


def bench_lora_merge(device, dtype, rounds, quick, rank=32):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = sd15_attention_projections()
    if quick:
        shapes = shapes[:16]
    weights = [torch.randn(o, i, generator=g).to(device, dtype) for o, i in shapes]
    ups = [torch.randn(o, rank, generator=g).to(device, dtype) for o, i in shapes]
    downs = [torch.randn(rank, i, generator=g).to(device, dtype) for o, i in shapes]
    scale = 1e-4
    scales = [scale] * len(shapes)

    def baseline():
        for w, u, d in zip(weights, ups, downs):
            w.addmm_(u, d, alpha=scale)

    def floor():  # what any in-place merge must move: one read and one write of every weight
        for w in weights:
            w.mul_(1.0)

    fns = {"baseline": baseline, "memory floor (w.mul_(1) per layer)": floor}
    for name in _backends("lora_merge", device):
        fns[name] = (lambda name: lambda: ops.lora_merge_(weights, ups, downs, scales, backend=name))(name)
        if name != "reference":
            fns[f"{name} (per-layer calls)"] = (lambda name: lambda: [  # noqa: E731
                ops.lora_merge_(w, u, d, scale, backend=name) for w, u, d in zip(weights, ups, downs)])(name)
    row = {"op": f"lora_merge (rank {rank}, {len(shapes)} SD1.5 attention projections)",
           "dtype": str(dtype).replace("torch.", ""), "baseline": "per-layer weight.addmm_"}
    row.update(_row(interleaved(fns, device, max(3, rounds // 2)), "baseline", "GBps",
                    2 * sum(w.numel() * w.element_size() for w in weights)))
    return [row]


def _describe(row):
    shape = row.get("shape")
    layout = row.get("layout", "")
    return f"{row['op']} {layout} {shape if shape is not None else ''}".strip()


def _machine(device):
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": (torch.cuda.get_device_name() if device == "cuda" else "cpu")}
    try:
        from sdfast import _C
        info["cpu_kernels_isa"] = _C.cpu_isa()
    except (ImportError, AttributeError):
        info["cpu_kernels_isa"] = None
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per row")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU time (CPU device with --threads 1 only)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--only", default=None, help="comma-separated: group_norm,attention,lora_merge")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    parser.add_argument("--note", default="", help="free text stored with the results (conditions)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    out = Path(args.out or ROOT / "bench" / "results" / f"kernels-{args.device}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock process needs --device cpu --threads 1 (CPU time sums threads)")
    global _clock
    _clock = CLOCKS[args.clock]
    only = set(args.only.split(",")) if args.only else {"group_norm", "attention", "lora_merge"}
    load_before = os.getloadavg()
    rows = []
    for op, bench in (("group_norm", bench_group_norm), ("attention", bench_attention),
                      ("lora_merge", bench_lora_merge)):
        if op in only:
            rows += bench(args.device, dtype, args.rounds, args.quick)
    for row in rows:
        speed = ", ".join(f"{name} {r['speedup']:.2f}x" for name, r in row["backends"].items()
                          if name != "reference")
        print(f"{_describe(row):70s} baseline {row['baseline_s'] * 1e3:8.2f} ms  {speed}")
    result = {
        "machine": _machine(args.device),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "torch": torch.__version__, "dtype": str(dtype), "rounds": args.rounds,
        "timing": f"interleaved rounds, {args.clock} clock; speedup = median per-round baseline_s / s",
        "note": args.note, "quick": args.quick, "command": " ".join(["python", "bench/kernels.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
