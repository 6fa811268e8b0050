"""Step caching (`generate(cache_interval=N)`, DeepCache): speed-up and cost in quality.

    python bench/step_cache.py [--model CKPT] [--intervals 2,3,5] [--depths 2] [--steps 20]
                               [--repeats 5] [--psnr-prompts 16] [--adherence-n 200]
                               [--threads 1] [--out bench/results/step-cache-cpu.json]

For each cache depth D and interval N (N = 1 is the uncached baseline, measured in the same
run), on the model (default: the built-in one):

- speed: a full `generate` (text encoder, `steps` euler steps at cfg 5, VAE decode; batch 1,
  native size), interleaved over the variants, medians with min/max; `speedup` = uncached
  median / cached median. Also the UNet FLOP fraction of a cached step (torch's FLOP counter,
  with sdfast's attention counted as 4*B*H*N*M*D) and the UNet-only speed-up it implies,
  N / (1 + (N - 1) * fraction), for this model and for SD1.5 at 512x512;
- PSNR of the cached image against the uncached one (same prompt and seed), over
  `psnr-prompts` held-out shapes prompts: mean, min, max;
- prompt adherence: `sdfast.eval.shapes_eval.evaluate(pipe, n=adherence-n, cache_interval=N)`
  (held-out prompts, 20 steps, cfg 5, euler), accuracy per attribute and its change in
  percentage points against the uncached run. `--adherence-n 0` skips it.

The model file's SHA-256 is recorded. Not a test: speed depends on the machine and on whatever
else runs on it (the load average is recorded); `--threads 1` keeps torch's OpenMP threads from
spin-waiting on an oversubscribed machine.
"""
import argparse
import sys

import torch

from _record import ROOT, interleaved, sha256, write_result

import sdfast  # noqa: E402  (after _record put the repository on sys.path)
from sdfast.bench.measure import psnr  # noqa: E402
from sdfast.eval.shapes_eval import evaluate, select_prompts  # noqa: E402
from sdfast.models.unet import UNetConfig, UNetModel  # noqa: E402

SETTINGS = dict(steps=20, cfg=5.0, sampler="euler", scheduler="normal")


def _attention_flops(q, k, v, backend, *args, out_shape=None, **kwargs):
    b, h, n, d = q                           # FLOP formulas receive shapes
    return 4 * b * h * n * k[2] * d          # q @ k^T and p @ v, 2 FLOPs per multiply-add


def shallow_fraction(unet_or_config, latent, depth):
    """FLOPs of the shallow branch / FLOPs of the whole UNet (batch 2, 77 tokens), on meta."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    if torch.ops.sdfast.attention not in flop_registry:
        register_flop_formula(torch.ops.sdfast.attention)(_attention_flops)
    config = getattr(unet_or_config, "config", unet_or_config)
    with torch.device("meta"):
        unet = UNetModel(config).eval()
        x = torch.randn(2, config.in_channels, latent, latent)
        t = torch.ones(2)
        ctx = torch.randn(2, 77, config.context_dim)
    with torch.no_grad():
        with FlopCounterMode(display=False) as whole:
            _, deep = unet.forward_with_cache(x, t, ctx, depth=depth)
        with FlopCounterMode(display=False) as shallow:
            unet.forward_with_cache(x, t, ctx, depth=depth, deep=deep)
    return shallow.get_total_flops() / whole.get_total_flops()


def unet_speedup(interval, fraction):
    return interval / (1 + (interval - 1) * fraction)


def speed_and_psnr(pipe, intervals, depth, repeats, n_prompts):
    prompt = select_prompts(1, seed=1)[0][0]
    fns = {n: (lambda n=n: pipe.generate(prompt, seed=1, cache_interval=n, cache_depth=depth,
                                         output="tensor", progress=False, **SETTINGS))
           for n in [1, *intervals]}
    times = interleaved(fns, repeats)
    prompts = [text for text, _, _ in select_prompts(n_prompts, seed=2)]
    seeds = list(range(100, 100 + n_prompts))
    images = {n: pipe.generate(prompts, seed=seeds, cache_interval=n, cache_depth=depth,
                               output="tensor", progress=False, **SETTINGS)
              for n in [1, *intervals]}
    fraction = shallow_fraction(pipe.unet, pipe.native_size[0] // 8, depth)
    sd15 = shallow_fraction(UNetConfig(), 64, depth)
    rows = []
    for n in intervals:
        values = psnr(images[n], images[1])
        row = {"depth": depth, "interval": n, "seconds": times[n], "seconds_uncached": times[1],
               "speedup": times[1]["median_s"] / times[n]["median_s"],
               "shallow_flop_fraction": fraction, "unet_speedup_flops": unet_speedup(n, fraction),
               "sd15_512_shallow_flop_fraction": sd15, "sd15_512_unet_speedup_flops": unet_speedup(n, sd15),
               "psnr_db": {"mean": values.mean().item(), "min": values.min().item(),
                           "max": values.max().item(), "images": len(values)}}
        rows.append(row)
        print(f"depth {depth} N={n}: speed-up {row['speedup']:.2f}x (FLOPs: {row['unet_speedup_flops']:.2f}x "
              f"here, {row['sd15_512_unet_speedup_flops']:.2f}x SD1.5 512), PSNR mean "
              f"{row['psnr_db']['mean']:.1f} dB (min {row['psnr_db']['min']:.1f})", flush=True)
    return rows


def adherence(pipe, intervals, depth, n):
    base = evaluate(pipe, n=n, **SETTINGS)["accuracy"]
    out = {"uncached": base}
    for interval in intervals:
        acc = evaluate(pipe, n=n, cache_interval=interval, cache_depth=depth, **SETTINGS)["accuracy"]
        delta = {k: None if acc[k] is None or base[k] is None else 100 * (acc[k] - base[k]) for k in acc}
        out[f"depth{depth}_interval{interval}"] = {"accuracy": acc, "delta_points": delta}
        print(f"adherence depth {depth} N={interval}: all {100 * acc['all']:.1f}% "
              f"(uncached {100 * base['all']:.1f}%, {delta['all']:+.1f} points)", flush=True)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    parser.add_argument("--intervals", default="2,3,5")
    parser.add_argument("--depths", default=None, help="comma-separated (default: the default depth)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--psnr-prompts", type=int, default=16)
    parser.add_argument("--adherence-n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "step-cache-cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sdfast.builtin import resolve_model
    from sdfast.pipeline import DEFAULT_CACHE_DEPTH

    path = resolve_model(args.model)
    pipe = sdfast.load(path, device="cpu")
    intervals = [int(s) for s in args.intervals.split(",")]
    depths = [int(s) for s in args.depths.split(",")] if args.depths else [DEFAULT_CACHE_DEPTH]
    rows, quality = [], {}
    for depth in depths:
        rows += speed_and_psnr(pipe, intervals, depth, args.repeats, args.psnr_prompts)
        if args.adherence_n:
            quality.update(adherence(pipe, intervals, depth, args.adherence_n))
    write_result(args.out, "step_cache.py", argv, {
        "model": {"path": str(path), "sha256": sha256(path)},
        "settings": {**SETTINGS, "batch": 1, "size": list(pipe.native_size)},
        "rows": rows, "adherence": {"n": args.adherence_n, **quality}})


if __name__ == "__main__":
    main()
