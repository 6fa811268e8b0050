"""ONNX Runtime (CPU) against sdfast's torch backend, measured in the same run.

    python bench/export.py [--model CKPT] [--sizes 64,128] [--steps 20] [--repeats 5]
                           [--threads N] [--out bench/results/export-cpu.json]

Not a test: it asserts nothing and its numbers depend on the machine (and on what else runs on
it: the load average at the start and the end is recorded). The model (default: the built-in
one) is exported to a temporary folder, then for each image size:

- unet_step: one UNet call at batch 2 (CFG's cond + uncond), 77 tokens, median of `repeats`;
- full_image: `generate(steps=N)` end to end (text encoder, N UNet steps, VAE decode), median.

`speedup` = torch seconds / onnxruntime seconds (above 1: ONNX Runtime is faster). Both
backends run float32; `--threads N` gives both N intra-op threads (default: each library's
own choice). On a machine shared with other jobs use `--threads 1`: torch's OpenMP threads
spin-wait when the cores are oversubscribed and its times then grow many-fold.
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import _record  # noqa: E402  (puts the repository on sys.path)
from _record import ROOT  # noqa: E402

import sdfast  # noqa: E402
from sdfast.export import export_onnx  # noqa: E402
from sdfast.export.ort import open_onnx  # noqa: E402


def median_seconds(fn, repeats):
    fn()                                           # warm-up (allocations, ORT's first run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(pt, po, size, steps, repeats):
    latent = size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, pt.unet.config.in_channels, latent, latent, generator=gen)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, pt.unet.config.context_dim, generator=gen)

    def torch_step():
        with torch.no_grad():
            pt.unet(x, t, ctx)

    rows = []
    for what, fns in (
            ("unet_step", (torch_step, lambda: po.unet(x, t, ctx))),
            ("full_image", tuple(lambda p=p: p.generate("a red circle on a blue background",
                                                        width=size, height=size, steps=steps,
                                                        seed=1, progress=False)
                                 for p in (pt, po)))):
        torch_s = median_seconds(fns[0], repeats)
        ort_s = median_seconds(fns[1], repeats)
        rows.append({"what": what, "size": size, "batch": 2 if what == "unet_step" else 1,
                     "steps": steps if what == "full_image" else 1,
                     "torch_s": torch_s, "onnxruntime_s": ort_s, "speedup": torch_s / ort_s})
        print(f"{what:10s} {size:4d}px  torch {torch_s * 1e3:9.1f} ms  onnxruntime "
              f"{ort_s * 1e3:9.1f} ms  speedup {torch_s / ort_s:5.2f}x", flush=True)
    return rows


def main(argv=None):
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    parser.add_argument("--sizes", default="64,128", help="square image sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for both")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "export-cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_onnx(args.model, Path(tmp) / "onnx")
        export_s = time.perf_counter() - start
        pt = sdfast.load(args.model, device="cpu")
        po = open_onnx(Path(tmp) / "onnx", device="cpu", threads=args.threads)
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            rows += bench_size(pt, po, size, args.steps, args.repeats)
    _record.write_result(args.out, "export.py", argv, {
        "model": args.model or "built-in (sdfast-shapes)", "export_s": export_s,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows},
        _record.machine(onnxruntime_threads=args.threads or "default"),
        versions={"onnxruntime": onnxruntime.__version__})


if __name__ == "__main__":
    main()
