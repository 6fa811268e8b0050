"""SD1.5 on one GPU: sampling it/s at 512x512, batch 1 with CFG, fp16, and where the time goes.

    python bench/gpu_sd15.py [--steps 50] [--repeats 3] [--dtype fp16] [--quick]
                             [--out bench/results/gpu-sd15-512.json]

Goal (issue 8): 150 it/s or more on one H100 (stable-fast reports 104.6; the FLOP bound is
about 590). Random weights with SD1.5's UNet config (no download). An "it" is one sampler
step: sdfast's CFG denoiser (cond + uncond as one batch of 2, 77 tokens) and an euler update,
so the Python around each UNet call counts. Variants, interleaved, medians of `repeats` runs of
`steps` steps each (CUDA synchronised around each run):

- `eager`, `channels_last`: sdfast's UNet with its fused ops (cuda / triton backends);
- `cuda_graphs`: `GraphedUNet` (one captured graph, replayed per step), channels-last;
- `compile`: `torch.compile(mode="max-autotune-no-cudagraphs", fullgraph=True)`, then the
  same with CUDA graphs (`compile_cuda_graphs`); skipped with `--quick`;
- `step_cache_3`: `cuda_graphs` plus step caching every 3rd call (an approximation: reported
  apart from the exact variants);
- `diffusers`: diffusers' UNet2DConditionModel (SDPA) in the same loop, the baseline; and
  `diffusers_accelerated`, the same after `sdfast.accelerate`.

The torch profiler's table of the `channels_last` variant (5 steps, sorted by CUDA time) is
written next to the JSON (`...-profile.txt`). `--quick` (a few steps, one repeat, no compile)
is what tests/gpu/test_gpu_pipeline.py runs.
"""
import argparse
import sys
from pathlib import Path

import torch

from _record import ROOT, interleaved, write_result

import sdfast  # noqa: E402
from sdfast import sampling  # noqa: E402
from sdfast.cuda_graphs import GraphedUNet  # noqa: E402
from sdfast.guidance import CFGDenoiser, StepCache, UNetCall  # noqa: E402
from sdfast.models.unet import UNetConfig, UNetModel  # noqa: E402

GOAL_ITS = 150.0


def sampler_loop(unet, dtype, steps, cache_interval=1):
    """A callable running `steps` euler steps at batch 1 with CFG through `unet`."""
    ms = sampling.ModelSampling().to("cuda")
    sigmas = sampling.get_sigmas("normal", ms, steps).to("cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    cond = torch.randn(1, 77, 768, device="cuda", generator=gen)
    uncond = torch.randn(1, 77, 768, device="cuda", generator=gen)
    noise = torch.randn(1, 4, 64, 64, device="cuda", generator=gen)

    @torch.no_grad()
    def run():
        cache = StepCache(cache_interval, 2) if cache_interval > 1 else None
        denoiser = CFGDenoiser(sampling.make_denoiser(UNetCall(unet, dtype, cache=cache), ms),
                               cond, uncond, 5.0)
        return sampling.sample_euler(denoiser, noise * sigmas[0], sigmas)
    return run


class DiffusersAdapter(torch.nn.Module):
    """diffusers' UNet called as sdfast's: `(x, timesteps, context) -> eps`."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context, control=None):
        return self.unet(x, timesteps, encoder_hidden_states=context).sample


def diffusers_unet(dtype):
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from _diffusers_models import UNET_CONFIGS

    return UNet2DConditionModel(**UNET_CONFIGS["sd15"]).to("cuda", dtype).eval()


def variants(dtype, steps, quick):
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).to("cuda", dtype).eval()
    nhwc = UNetModel(UNetConfig()).to("cuda", dtype).eval().to(memory_format=torch.channels_last)
    nhwc.load_state_dict(unet.state_dict())
    fns = {"eager": sampler_loop(unet, dtype, steps),
           "channels_last": sampler_loop(nhwc, dtype, steps),
           "cuda_graphs": sampler_loop(GraphedUNet(nhwc), dtype, steps),
           "step_cache_3": sampler_loop(GraphedUNet(nhwc), dtype, steps, cache_interval=3)}
    if not quick:
        compiled = UNetModel(UNetConfig()).to("cuda", dtype).eval().to(memory_format=torch.channels_last)
        compiled.load_state_dict(unet.state_dict())
        compiled.compile(mode="max-autotune-no-cudagraphs", fullgraph=True)
        fns["compile"] = sampler_loop(compiled, dtype, steps)
        fns["compile_cuda_graphs"] = sampler_loop(GraphedUNet(compiled), dtype, steps)
    theirs = diffusers_unet(dtype)
    fns["diffusers"] = sampler_loop(DiffusersAdapter(theirs), dtype, steps)
    accelerated = diffusers_unet(dtype)
    sdfast.accelerate(accelerated)
    fns["diffusers_accelerated"] = sampler_loop(DiffusersAdapter(accelerated), dtype, steps)
    return fns, nhwc


def profile_table(unet, dtype, path):
    from torch.profiler import ProfilerActivity, profile

    run = sampler_loop(unet, dtype, 5)
    run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    Path(path).write_text(table + "\n")
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--quick", action="store_true", help="5 steps, 1 repeat, no compile")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-sd15-512.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_sd15.py: error: needs a CUDA device", file=sys.stderr)
        return 2
    if args.quick:
        args.steps, args.repeats = 5, 1
    dtype = sdfast.parse_dtype(args.dtype)
    torch.backends.cudnn.benchmark = True
    fns, nhwc = variants(dtype, args.steps, args.quick)
    times = interleaved(fns, args.repeats, sync=torch.cuda.synchronize)
    rows = {name: {**t, "it_per_s": args.steps / t["median_s"]} for name, t in times.items()}
    for name, row in rows.items():
        print(f"{name:22s} {row['it_per_s']:8.1f} it/s", flush=True)
    profile_path = Path(args.out).with_name(Path(args.out).stem + "-profile.txt")
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    profile_table(nhwc, dtype, profile_path)
    exact = {k: v["it_per_s"] for k, v in rows.items() if k != "step_cache_3"}
    best = max(exact, key=exact.get)
    write_result(args.out, "gpu_sd15.py", argv, {
        "settings": {"resolution": 512, "batch": 1, "cfg": True, "dtype": args.dtype,
                     "steps": args.steps, "sampler": "euler"},
        "goal_it_per_s": GOAL_ITS, "best_exact": {"variant": best, "it_per_s": exact[best],
                                                  "goal_met": exact[best] >= GOAL_ITS},
        "speedup_vs_diffusers": {k: v["it_per_s"] / rows["diffusers"]["it_per_s"] for k, v in rows.items()},
        "rows": rows, "profile": str(profile_path)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
