"""`sdfast.accelerate` on diffusers models at SD1.5 shapes: speed-up over plain diffusers.

    python bench/accelerate_diffusers.py [--resolution 256] [--repeats 5] [--threads 1]
                                         [--out bench/results/accelerate-cpu.json]

Random-weight diffusers `UNet2DConditionModel` and `AutoencoderKL` with SD1.5's configs (no
download). The same instances are timed plain and accelerated, interleaved: each round runs
the plain model, accelerates it, runs it again and undoes the change. Rows: one UNet step at
batch 2 (CFG's cond + uncond, 77 tokens), one VAE decode at batch 1. Medians with min/max;
`speedup` = plain / accelerated median. The outputs are also compared (max abs difference).
Not a test: numbers depend on the machine and on whatever else runs on it (the load average
is recorded). Use `--threads 1` on a shared machine: torch's OpenMP threads spin-wait when the
cores are oversubscribed, which swamps any difference being measured.
"""
import argparse
import sys

import torch

from _record import ROOT, interleaved, write_result

sys.path.insert(0, str(ROOT / "tests"))
import sdfast  # noqa: E402
from _diffusers_models import make_unet, make_vae  # noqa: E402


def toggled(model, call):
    """`(plain, accelerated)` callables over the same instance: accelerate on, call, undo."""
    def accelerated():
        handle = sdfast.accelerate(model)
        try:
            return call()
        finally:
            handle.undo()
    return call, accelerated


@torch.no_grad()
def rows_for(resolution, repeats):
    latent = resolution // 8
    g = torch.Generator().manual_seed(0)
    unet = make_unet("sd15")
    x = torch.randn(2, 4, latent, latent, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=g)
    vae = make_vae("sd")
    z = torch.randn(1, 4, latent, latent, generator=g)
    rows = []
    for what, model, call, batch in (
            ("unet_step", unet, lambda: unet(x, t, ctx).sample, 2),
            ("vae_decode", vae, lambda: vae.decode(z).sample, 1)):
        plain, accelerated = toggled(model, call)
        diff = (plain() - accelerated()).abs().max().item()
        times = interleaved({"diffusers": plain, "accelerated": accelerated}, repeats)
        speedup = times["diffusers"]["median_s"] / times["accelerated"]["median_s"]
        rows.append({"what": what, "resolution": resolution, "batch": batch, **times,
                     "speedup": speedup, "max_abs_diff": diff})
        print(f"{what:10s} {resolution}px  diffusers {times['diffusers']['median_s']:.3f} s  "
              f"accelerated {times['accelerated']['median_s']:.3f} s  speedup {speedup:.2f}x  "
              f"max|diff| {diff:.2e}", flush=True)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "accelerate-cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = rows_for(args.resolution, args.repeats)
    write_result(args.out, "accelerate_diffusers.py", argv,
                 {"models": "random diffusers UNet2DConditionModel / AutoencoderKL, SD1.5 configs, "
                            "fp32", "rows": rows})


if __name__ == "__main__":
    main()
