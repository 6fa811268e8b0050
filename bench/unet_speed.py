"""sdfast against diffusers on the same random SD1.5 weights: the UNet step and the full image.

    python bench/unet_speed.py [--suite step,image,profile] [--resolution 256] [--batch 2]
                               [--threads N] [--clock wall|process] [--rounds R]
                               [--image-resolution 512] [--image-steps 20] [--image-rounds 2]
                               [--out bench/results/unet-speed-cpu.json]

Not a test: it asserts nothing and its numbers depend on the machine. Both sides run in one
process on the same weights (diffusers' `UNet2DConditionModel` / `StableDiffusionPipeline` with
seeded random weights, the configs of tests/_diffusers_models.py; sdfast's UNet shares the very
tensors, its pipeline loads them from an LDM single file), fp32, eager, no_grad.

- step: one UNet call at `--resolution` (latents 1/8 of it), `--batch` (2: CFG's cond + uncond),
  77 context tokens; diffusers on NCHW latents as users call it, and on channels-last latents.
- image: text encoder + `--image-steps` Euler steps with CFG 7 + VAE decode, at
  `--image-resolution` (`pipe(...)` against `sdfast.load(...).generate(...)`).
- profile: where each side's step time goes (one call each, per aten / sdfast op, CPU time of
  the calling thread with --threads 1), by category, with each category's GFLOP/s and its share
  of the machine's sgemm roofline (the GFLOP/s of a 2048^3 torch.mm measured in the same run).
  Convolution FLOPs are the direct convolution's (2 * outputs * Cin * kh * kw), also for
  Winograd, so its "GFLOP/s" is the direct-equivalent rate.

Timing: interleaved rounds (every round runs each contender once, the order rotated), after a
warm-up call each; a contender's time is its median over rounds (with min and max), a ratio the
median over rounds of the per-round ratio, so a change of machine load hits both alike.
`--clock process --threads 1` times CPU time instead of wall time: one core's efficiency, blind
to the time a busy machine takes the core away. The load average is recorded before and after.
"""
import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import _record  # noqa: E402
from _diffusers_models import make_unet  # noqa: E402
from sdfast.bench.kernels import sgemm_gflops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"


def interleaved(fns, rounds, clock):
    """{name: per-round seconds} for the callables `fns`, one warm-up call each, then `rounds`
    rounds running each once in a rotated order."""
    names = list(fns)
    for name in names:
        fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def summarize(times, baseline):
    """Median / min / max per contender and the median per-round speed-up over `baseline`."""
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "rounds_s": ts,
                     "speedup_vs_" + baseline: statistics.median(b / t for b, t in zip(base, ts))}
    return out


def sd15_unets():
    """diffusers' SD1.5 UNet (random weights) and sdfast's UNet on the same tensors."""
    from sdfast.io.diffusers_unet import unet_diffusers_to_ldm
    from sdfast.models.unet import UNetConfig, UNetModel

    ref = make_unet("sd15")
    with torch.device("meta"):
        ours = UNetModel(UNetConfig())  # the defaults are SD1.5
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict()), strict=True, assign=True)
    return ref, ours.eval()


def step_inputs(resolution, batch):
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.linspace(999.0, 10.5, batch)
    context = torch.randn(batch, 77, 768, generator=g)
    return x, t, context


def bench_step(args, clock):
    ref, ours = sd15_unets()
    x, t, context = step_inputs(args.resolution, args.batch)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    fns = {"diffusers": lambda: ref(x, t, context).sample,
           "diffusers (channels-last input)": lambda: ref(x_cl, t, context).sample,
           "sdfast": lambda: ours(x, t, context)}
    with torch.no_grad():
        times = interleaved(fns, args.rounds, clock)
    return {"resolution": args.resolution, "batch": args.batch, "context_tokens": 77,
            "results": summarize(times, "diffusers")}


def sd15_pipelines(tmp):
    """diffusers' StableDiffusionPipeline with random SD1.5 weights and `sdfast.load` of the
    same weights written as an LDM single file."""
    import sdfast
    from _pipelines import make_reference, save_single_file

    ref = make_reference("sd15", tmp)
    path = save_single_file(ref, "sd1", tmp / "sd15-random.safetensors")
    return ref, sdfast.load(path)


def bench_image(args, clock):
    side = args.image_resolution // 8
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        ref, pipe = sd15_pipelines(Path(tmp))

        def diffusers_image():
            return ref(PROMPT, negative_prompt=NEGATIVE, latents=noise.clone(),
                       height=args.image_resolution, width=args.image_resolution,
                       num_inference_steps=args.image_steps, guidance_scale=7.0, output_type="pt").images

        def sdfast_image():
            return pipe.generate(PROMPT, NEGATIVE, width=args.image_resolution,
                                 height=args.image_resolution, steps=args.image_steps, cfg=7.0,
                                 noise=noise, output="tensor", progress=False)

        with torch.no_grad():
            diff = (diffusers_image() - sdfast_image()).abs().max().item()
            times = interleaved({"diffusers": diffusers_image, "sdfast": sdfast_image},
                                args.image_rounds, clock)
    return {"resolution": args.image_resolution, "steps": args.image_steps, "cfg": 7.0,
            "sampler": "euler (both)", "max_abs_image_difference": diff,
            "results": summarize(times, "diffusers")}


# --- profile ---------------------------------------------------------------------------------

def _category(name):
    if "conv" in name:
        return "convolution"
    if name in ("addmm", "mm", "bmm", "baddbmm", "linear", "matmul"):
        return "gemm"
    if "attention" in name:
        return "attention"
    if "norm" in name:
        return "norm"
    return "other (elementwise, copies, ...)"


def _flops(name, args, out):
    """Multiply-adds x 2 of a GEMM-like op (convolutions: the direct convolution's count)."""
    shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
    if name in ("convolution", "conv2d"):
        w = shapes[1]
        return 2 * out.numel() * w[1] * w[2] * w[3]
    if name == "addmm":
        (m, k), n = shapes[1], shapes[2][1]
        return 2 * m * n * k
    if name == "mm":
        (m, k), n = shapes[0], shapes[1][1]
        return 2 * m * n * k
    if name in ("bmm", "baddbmm"):
        a, b = shapes[-2], shapes[-1]
        return 2 * a[0] * a[1] * a[2] * b[2]
    if "attention" in name:
        q, k = shapes[0], shapes[1]
        return 4 * q[0] * q[1] * q[2] * k[2] * q[3]
    return 0


class _OpTimer(TorchDispatchMode):
    """Time and FLOPs per op category of everything run under it (sdfast's custom ops count as
    one op each: what runs inside them is not seen again)."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.seconds = collections.defaultdict(float)
        self.flops = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = self.clock()
        out = func(*args, **(kwargs or {}))
        elapsed = self.clock() - start
        name = func.overloadpacket.__name__
        self.seconds[_category(name)] += elapsed
        if isinstance(out, torch.Tensor):
            self.flops[_category(name)] += _flops(name, args, out)
        return out


def bench_profile(args, clock):
    ref, ours = sd15_unets()
    x, t, context = step_inputs(args.resolution, args.batch)
    op_clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    roofline = sgemm_gflops(op_clock)
    out = {"resolution": args.resolution, "batch": args.batch, "sgemm_roofline_GFLOPs": roofline,
           "op_clock": "thread CPU time" if op_clock is time.thread_time else "wall", "models": {}}
    for name, fn in (("diffusers", lambda: ref(x, t, context).sample), ("sdfast", lambda: ours(x, t, context))):
        with torch.no_grad():
            fn()
            timer = _OpTimer(op_clock)
            start = op_clock()
            with timer:
                fn()
            total = op_clock() - start
        cats = {}
        for cat, sec in sorted(timer.seconds.items(), key=lambda kv: -kv[1]):
            gflops = timer.flops[cat] / sec / 1e9 if sec else 0.0
            cats[cat] = {"s": sec, "share": sec / total, "GFLOP": timer.flops[cat] / 1e9,
                         "GFLOPs": gflops, "share_of_roofline": gflops / roofline}
        out["models"][name] = {"total_s": total, "categories": cats}
    return out


# --- report ----------------------------------------------------------------------------------

def _print(result):
    for suite in ("step", "image"):
        if suite not in result:
            continue
        print(f"-- {suite}")
        for name, r in result[suite]["results"].items():
            print(f"  {name:34s} median {r['median_s']:8.3f} s  (min {r['min_s']:.3f}, max "
                  f"{r['max_s']:.3f})  speed-up vs diffusers {r['speedup_vs_diffusers']:.2f}x")
    if "profile" in result:
        p = result["profile"]
        print(f"-- profile (sgemm roofline {p['sgemm_roofline_GFLOPs']:.0f} GFLOP/s, {p['op_clock']})")
        for name, m in p["models"].items():
            print(f"  {name}: {m['total_s']:.3f} s")
            for cat, c in m["categories"].items():
                print(f"    {cat:34s} {c['s']:7.3f} s {100 * c['share']:5.1f}%  {c['GFLOPs']:7.1f} GFLOP/s "
                      f"({100 * c['share_of_roofline']:.0f}% of roofline)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="step,profile", help="comma-separated: step,image,profile")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the step")
    parser.add_argument("--image-resolution", type=int, default=512)
    parser.add_argument("--image-steps", type=int, default=20)
    parser.add_argument("--image-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="process: CPU time (needs --threads 1)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/unet-speed-cpu.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and torch.get_num_threads() != 1:
        parser.error("--clock process needs --threads 1 (CPU time sums the threads)")
    clock = CLOCKS[args.clock]
    suites = [s for s in args.suite.split(",") if s]
    unknown = set(suites) - {"step", "image", "profile"}
    if unknown:
        parser.error(f"unknown suite(s) {sorted(unknown)}")
    out = Path(args.out or ROOT / "bench" / "results" / "unet-speed-cpu.json")
    import diffusers

    result = {"dtype": "float32", "load_average": {"before": os.getloadavg()},
              "timing": f"interleaved rounds, {args.clock} clock; speed-up = median per-round ratio"}
    for suite, fn in (("step", bench_step), ("profile", bench_profile), ("image", bench_image)):
        if suite in suites:
            result[suite] = fn(args, clock)
            result["load_average"]["after_" + suite] = os.getloadavg()
    _print(result)
    _record.write_result(out, "unet_speed.py", argv, result,
                         versions={"diffusers": diffusers.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
