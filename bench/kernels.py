"""Kernel benchmarks: every backend of every op against the torch baseline timed in the same run.

    python bench/kernels.py [--device cpu|cuda] [--quick] [--threads N] [--rounds R]
                            [--clock wall|process] [--only OPS] [--out bench/results/kernels-cpu.json]

Not a test: it asserts nothing and its numbers depend on the machine. Each row times one case
(SD1.5 shapes) with the baseline the issue names, interleaved with it: every round runs the
baseline and each backend one after another (order rotated), so a change of machine load (a
shared CPU) hits them alike; a speed-up is the median over rounds of the per-round ratio, a
time the median per call. `--threads 1 --clock process` times CPU time instead of wall time:
one core's efficiency, blind to the time a busy machine takes the core away.

The cases, their baselines and their GB/s or TFLOP/s formulas are `sdfast.bench.kernels`
(shared with `sdfast bench --suite kernels`, which times the dispatched op only, adds conv2d and
the GEMM roofline). Here: group_norm (+SiLU, and + the time-embedding add), attention (cross
and self), and lora_merge with every backend once with the whole list of weights and once per
layer, beside the floor any in-place merge has, `w.mul_(1)` on every weight.

The summary prints each backend's speed-up over the baseline and writes everything, with the
machine (its load average before and after, the CPU kernels' instruction set) and the torch
version, as JSON.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

import _record  # noqa: E402  (puts the repository on sys.path)
from _record import ROOT  # noqa: E402

from sdfast import ops  # noqa: E402
from sdfast.bench import kernels as K  # noqa: E402

# SD1.5 UNet at 512x512 (64x64 latents), batch 2 (CFG).
GN_SHAPES = K.sd15_levels(64)
ATTN_SHAPES = K.attention_shapes(64)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCKS["wall"]


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


def _rows(cases, op, device, rounds):
    """One result row per case: the baseline, every backend of `op` here, the case's extras."""
    rows = []
    for case in cases:
        fns = {"baseline": case.baseline,
               **{name: case.run(name) for name in _backends(op, device)}, **case.extras}
        unit = {"GB/s": "GBps", "TFLOP/s": "TFLOPs"}[case.unit[0]]
        row = {"op": case.op, **case.describe}
        # self-attention at 64x64 runs for seconds on a CPU: fewer rounds there
        few = max(3, rounds // 3) if case.slow else rounds
        row.update(_row(K.interleaved(fns, device, few, clock=_clock), "baseline", unit, case.amount))
        rows.append(row)
    return rows


def bench_group_norm(device, dtype, rounds, quick):
    cases = K.group_norm_cases(GN_SHAPES[:2] if quick else GN_SHAPES, 2, device, dtype,
                               adds=(False, True))
    return _rows(cases, "group_norm", device, rounds)


def bench_attention(device, dtype, rounds, quick):
    cases = K.attention_cases(ATTN_SHAPES[:1] if quick else ATTN_SHAPES, 2, device, dtype)
    if device == "cpu" and quick:
        cases = [c for c in cases if not (c.op == "attention (self)" and c.describe["shape"]["N"] > 1024)]
    return _rows(cases, "attention", device, rounds)


def bench_lora_merge(device, dtype, rounds, quick, rank=32):
    shapes = K.sd15_attention_projections()
    per_layer = [b for b in _backends("lora_merge", device) if b != "reference"]
    case = K.lora_merge_case(device, dtype, shapes[:16] if quick else shapes, rank, per_layer)
    return _rows([case], "lora_merge", device, max(3, rounds // 2))


def _describe(row):
    shape = row.get("shape")
    layout = row.get("layout", "")
    return f"{row['op']} {layout} {shape if shape is not None else ''}".strip()


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
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    _record.write_result(out, "kernels.py", argv, {
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "dtype": str(dtype), "rounds": args.rounds,
        "timing": f"interleaved rounds, {args.clock} clock; speedup = median per-round baseline_s / s",
        "note": args.note, "quick": args.quick, "rows": rows}, _record.machine(device=device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
