"""Kernel benchmarks: every backend of every op against the torch baseline timed in the same run.

    python bench/kernels.py [--device cpu|cuda] [--quick] [--out bench/results/kernels-cpu.json]

Not a test: it asserts nothing and its numbers depend on the machine. Each row times one case
(SD1.5 shapes) with the baseline the issue names, measured in the same process right before:

- group_norm (+SiLU, + the ResBlock's time-embedding add where marked): baseline torch's
  `F.group_norm` followed by `F.silu` (and the `+` before it). Traffic counted as one read of x
  and one write of the output (what a fused kernel must move): GB/s = 2 * numel * itemsize / t.
- attention: baseline `F.scaled_dot_product_attention`. FLOPs = 4 * B * H * N * M * D (QK^T and
  PV, a multiply-add counted as 2), TFLOP/s = FLOPs / t.
- lora_merge: a rank-32 LoRA merged into every attention projection of the SD1.5 UNet (to_q,
  to_k, to_v, to_out.0 of its 16 transformer blocks); baseline a per-layer
  `weight.addmm_(up, down, alpha=scale)` loop. GB/s = (read + write of every weight) / t.

The summary prints each backend's speed-up over the baseline (median of timed repeats after
warm-up) and writes everything, with the machine and the torch version, as JSON.
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


def timeit(fn, device, repeats, min_time=0.2):
    """Median seconds per call of `fn` (after warm-up), `repeats` batches of calls lasting
    at least `min_time` each in all."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(min_time / repeats / once))
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _backends(op, device):
    """The non-reference backends that run this op on `device` here (the triton interpreter
    on CPU is a test tool, not a speed-up, so it is not timed)."""
    names = [b for b in ops.backends(op) if b != "reference"]
    if device == "cpu":
        names = [b for b in names if b == "cpu"]
    return ["reference", *names]


def bench_group_norm(device, dtype, repeats, quick):
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

                base = timeit(baseline, device, repeats)
                nbytes = 2 * x.numel() * x.element_size()
                row = {"op": "group_norm+silu" + ("+add" if add else ""), "layout": layout,
                       "shape": [2, c, h, w], "dtype": str(dtype).replace("torch.", ""),
                       "baseline": "F.group_norm + F.silu" + (" (+ add)" if add else ""),
                       "baseline_s": base, "baseline_GBps": nbytes / base / 1e9, "backends": {}}
                for name in _backends("group_norm", device):
                    fn = lambda: ops.group_norm(x, 32, weight, bias, 1e-5, silu=True, add=emb,  # noqa: E731
                                                backend=name)
                    t = timeit(fn, device, repeats)
                    row["backends"][name] = {"s": t, "GBps": nbytes / t / 1e9,
                                             "speedup": base / t}
                rows.append(row)
    return rows


def bench_attention(device, dtype, repeats, quick):
    rows = []
    shapes = ATTN_SHAPES[:1] if quick else ATTN_SHAPES
    for n, heads, d in shapes:
        for kind, m in (("cross", 77), ("self", n)):
            if device == "cpu" and kind == "self" and n > 1024 and quick:
                continue
            q = torch.randn(2, heads, n, d, device=device, dtype=dtype)
            k = torch.randn(2, heads, m, d, device=device, dtype=dtype)
            v = torch.randn(2, heads, m, d, device=device, dtype=dtype)
            flops = 4 * 2 * heads * n * m * d
            base = timeit(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
            row = {"op": f"attention ({kind})", "shape": {"B": 2, "H": heads, "N": n, "M": m, "D": d},
                   "dtype": str(dtype).replace("torch.", ""), "baseline": "F.scaled_dot_product_attention",
                   "baseline_s": base, "baseline_TFLOPs": flops / base / 1e12, "backends": {}}
            for name in _backends("attention", device):
                t = timeit(lambda: ops.attention(q, k, v, backend=name), device, repeats)
                row["backends"][name] = {"s": t, "TFLOPs": flops / t / 1e12, "speedup": base / t}
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


def bench_lora_merge(device, dtype, repeats, quick, rank=32):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = sd15_attention_projections()
    if quick:
        shapes = shapes[:16]
    weights = [torch.randn(o, i, generator=g).to(device, dtype) for o, i in shapes]
    ups = [torch.randn(o, rank, generator=g).to(device, dtype) for o, i in shapes]
    downs = [torch.randn(rank, i, generator=g).to(device, dtype) for o, i in shapes]
    scale = 1e-4
    nbytes = 2 * sum(w.numel() * w.element_size() for w in weights)

    def baseline():
        for w, u, d in zip(weights, ups, downs):
            w.addmm_(u, d, alpha=scale)

    base = timeit(baseline, device, repeats)
    row = {"op": f"lora_merge (rank {rank}, {len(shapes)} SD1.5 attention projections)",
           "dtype": str(dtype).replace("torch.", ""), "baseline": "per-layer weight.addmm_",
           "baseline_s": base, "baseline_GBps": nbytes / base / 1e9, "backends": {}}
    for name in _backends("lora_merge", device):
        def merged():
            for w, u, d in zip(weights, ups, downs):
                ops.lora_merge_(w, u, d, scale, backend=name)
        t = timeit(merged, device, repeats)
        row["backends"][name] = {"s": t, "GBps": nbytes / t / 1e9, "speedup": base / t}
    return [row]


def _describe(row):
    shape = row.get("shape")
    layout = row.get("layout", "")
    return f"{row['op']} {layout} {shape if shape is not None else ''}".strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>.json)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    out = Path(args.out or ROOT / "bench" / "results" / f"kernels-{args.device}.json")

    rows = (bench_group_norm(args.device, dtype, args.repeats, args.quick)
            + bench_attention(args.device, dtype, args.repeats, args.quick)
            + bench_lora_merge(args.device, dtype, args.repeats, args.quick))
    for row in rows:
        speed = ", ".join(f"{name} {r['speedup']:.2f}x" for name, r in row["backends"].items()
                          if name != "reference")
        print(f"{_describe(row):70s} baseline {row['baseline_s'] * 1e3:8.2f} ms  {speed}")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")},
        "torch": torch.__version__, "dtype": str(dtype), "repeats": args.repeats,
        "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
