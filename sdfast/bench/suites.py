"""The suites of `sdfast bench`. Each returns `Row`s: one measurement, every runtime's samples,
the ratios against every baseline measured in the same run, and checks that the runtimes
computed the same thing (a baseline that does less work would otherwise look slow).

- unet:   one UNet call at `resolution`, the CFG batch (2 x batch), timestep 500.
- e2e:    a full `generate`: text encoder, `steps` Euler steps with CFG 7, VAE decode, PIL.
- lora:   load + merge of a rank-32 kohya LoRA (UNet and text encoder; its file not read
          before), and a swap A -> B with both files already read.
- load:   fresh processes: imports + load of the single file to a ready pipeline, and a first
          read of every weight; the page cache is warmed first, for every side alike.
- memory: fresh processes: peak resident memory of load + one generate.
- kernels: sdfast's dispatched ops ("sdfast") against torch's ("torch-reference":
          F.group_norm + F.silu, F.scaled_dot_product_attention, a per-layer addmm_ loop,
          F.conv2d) at SD1.5 shapes for `resolution` and the CFG batch, with GB/s or TFLOP/s
          (`sdfast.bench.kernels`), and the GEMM roofline (a 2048^3 torch.mm) that each
          attention and convolution row's rate is also given as a share of.

With `cache_interval` N (`--cache-interval`), e2e also times sdfast's generate with step caching
in the same interleaved rounds and adds a row: its speed-up over the uncached generate and the
PSNR of its image against the uncached one.
"""
import json
import os
from dataclasses import replace
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from .measure import Stats, interleave, timed
from .runtimes import Request

SUITES = ("kernels", "unet", "e2e", "lora", "load", "memory")
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"
CFG = 7.0
SEED = 0
# Speed-up goals (x faster than the baseline) and the memory goal (x of the baseline's peak).
GOALS = {"unet": {"vs": "diffusers", "at_least": 1.5}, "e2e": {"vs": "diffusers", "at_least": 1.5},
         "load": {"vs": "diffusers", "at_least": 3.0}, "lora": {"vs": "diffusers", "at_least": 5.0},
         "memory": {"vs": "diffusers", "at_most": 0.8}}
# Per-op goals of issue 4 (x faster than torch), by the start of the op's name.
KERNEL_GOALS = {"group_norm+silu": 2.5, "attention (cross)": 1.3, "lora_merge": 2.0}
CACHE_GOAL = 2.0               # issue 8: step caching at least 2x over the uncached generate
UNCACHED = "sdfast-uncached"   # the uncached generate in the cached row (not a table column)
CACHED = "sdfast-cached"       # sdfast's cached generate while e2e measures (its own row)


@dataclass
class Row:
    """One measurement of every runtime. `kind` "time": ratio = baseline / sdfast (speed-up);
    "memory": ratio = sdfast / baseline (fraction of the baseline's memory)."""

    suite: str
    name: str
    unit: str = "s"
    kind: str = "time"
    runs: dict = field(default_factory=dict)          # runtime -> Stats
    unavailable: dict = field(default_factory=dict)   # runtime -> why there is no figure
    checks: dict = field(default_factory=dict)        # runtime -> {check: value}
    notes: list = field(default_factory=list)
    goal: dict | None = None
    status: str | None = None                         # a suite that measured nothing: why
    work: dict | None = None     # {"amount", "unit", "scale", "roofline_GFLOPs"}: rates per call

    def ratios(self):
        ours = self.runs.get("sdfast")
        if ours is None:
            return {}
        out = {}
        for name, stats in self.runs.items():
            if name != "sdfast":
                a, b = (stats.median, ours.median) if self.kind == "time" else (ours.median, stats.median)
                out[name] = a / b
        return out

    def rates(self):
        """`{runtime: {"unit", "value", "share_of_roofline"?}}` of a row that did known work
        per call (bytes or FLOPs): the physical rate at each runtime's median time."""
        if not self.work:
            return {}
        out = {}
        for name, stats in self.runs.items():
            value = self.work["amount"] / stats.median / self.work["scale"]
            out[name] = {"unit": self.work["unit"], "value": value}
            if self.work.get("roofline_GFLOPs"):
                gflops = value * self.work["scale"] / 1e9
                out[name]["share_of_roofline"] = gflops / self.work["roofline_GFLOPs"]
        return out

    def goal_met(self):
        if not self.goal or self.goal["vs"] not in self.runs or "sdfast" not in self.runs:
            return None
        ratio = self.ratios()[self.goal["vs"]]
        return ratio >= self.goal["at_least"] if "at_least" in self.goal else ratio <= self.goal["at_most"]

    def as_dict(self):
        out = asdict(self)
        out["runs"] = {name: stats.as_dict() for name, stats in self.runs.items()}
        out["ratios"] = self.ratios()
        out["rates"] = self.rates()
        out["ratio_meaning"] = ("baseline / sdfast (x faster)" if self.kind == "time"
                                else "sdfast / baseline (fraction of the baseline's peak)")
        if self.goal:
            out["goal"] = {**self.goal, "met": self.goal_met()}
        return out


class Bench:
    """What every suite shares: settings, the runtimes, and in-process loaded models."""

    def __init__(self, model, runtimes, unavailable, device, dtype, resolution, steps, batch,
                 repeats, warmup, work_dir, log, cache_interval=None, cache_depth=None):
        self.model, self.runtimes, self.unavailable = model, runtimes, unavailable
        self.device, self.dtype = device, dtype
        self.resolution, self.steps, self.batch = resolution, steps, batch
        self.repeats, self.warmup, self.work_dir, self.log = repeats, warmup, work_dir, log
        self.cache_interval, self.cache_depth = cache_interval, cache_depth
        self._handles = {}
        self._paths = {}

    def row(self, suite, name, **kw):
        return Row(suite, name, unavailable=dict(self.unavailable), goal=GOALS.get(suite), **kw)

    def path(self, name):
        """The model path runtime `name` reads (prepared once, e.g. exported)."""
        if name not in self._paths:
            self._paths[name] = self.runtimes[name].prepare(self.model, self.work_dir, self.dtype)
        return self._paths[name]

    def loaded(self, row):
        """`{name: (runtime, pipeline)}` in this process; sdfast's pipeline is shared with
        the runtimes that only change how its ops run. A baseline that fails is reported."""
        out = {}
        for name, rt in self.runtimes.items():
            if name in row.unavailable:
                continue
            try:
                path = self.path(name)
                key = (type(rt).load, path)
                if key not in self._handles:
                    self.log(f"loading {self.model.label} for {name} ...")
                    self._handles[key] = rt.load(self.model, path, self.device, self.dtype)
                out[name] = (rt, self._handles[key])
            except Exception as exc:          # a broken baseline must not stop the suite
                if name == "sdfast":
                    raise
                row.unavailable[name] = f"failed: {type(exc).__name__}: {exc}"
        return out

    def release(self):
        self._handles.clear()
        import gc

        gc.collect()

    def sample(self, row, runners, warmup=None):
        """`{name: [value, ...]}` of `runners`, interleaved; a failing baseline is reported in
        `row.unavailable` and left out."""
        def progress(name, r):
            what = "warm-up" if r < 0 else f"{r + 1}/{self.repeats}"
            self.log(f"  {row.suite}: {name} {what}")

        runners = {n: _guarded(n, fn, row) for n, fn in runners.items()}
        warmup = self.warmup if warmup is None else warmup
        samples = interleave(runners, self.repeats, warmup, progress)
        return {n: v for n, v in samples.items() if n not in row.unavailable}

    def measure(self, row, runners):
        for name, values in self.sample(row, runners).items():
            row.runs[name] = Stats(values)
        return row


def _guarded(name, fn, row):
    def run():
        if name in row.unavailable:
            return None
        try:
            return fn()
        except Exception as exc:
            if name in ("sdfast", CACHED):
                raise
            row.unavailable[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
    return run


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------- suites
def suite_kernels(bench):
    import torch

    from . import kernels as K

    latent, rows, dev, dtype = bench.resolution // 8, 2 * bench.batch, bench.device, bench.dtype
    levels = K.sd15_levels(latent)
    other = {n: "not applicable: the kernels suite times sdfast's ops against torch's"
             for n in bench.runtimes if n not in ("sdfast", "torch-reference")}
    call, flops = K.sgemm(dev, dtype)
    roof = Row("kernels", f"GEMM roofline: torch.mm 2048^3 {K._dtype_name(dtype)}",
               unavailable=dict(other, sdfast="not applicable: torch's GEMM, the roofline"),
               work={"amount": flops, "unit": "GFLOP/s", "scale": 1e9})
    bench.measure(roof, {"torch-reference": timed(call, dev)})
    roofline = roof.rates()["torch-reference"]["value"]
    out = [roof]
    builders = (lambda: K.group_norm_cases(levels, rows, dev, dtype),
                lambda: K.attention_cases(K.attention_shapes(latent), rows, dev, dtype),
                lambda: [K.lora_merge_case(dev, dtype)],
                lambda: K.conv_cases(levels, rows, dev, dtype))
    with torch.no_grad():
        for build in builders:
            out += [_kernel_row(bench, case, other, roofline) for case in build()]
    return out


def _kernel_row(bench, case, other, roofline):
    """One case: sdfast's dispatched op against torch's, `inner` calls per sample."""
    from . import kernels as K

    goal = next((v for k, v in KERNEL_GOALS.items() if case.op.startswith(k)), None)
    flops = case.unit[0] == "TFLOP/s"
    row = Row("kernels", case.label(), unavailable=dict(other),
              goal={"vs": "torch-reference", "at_least": goal} if goal else None,
              work={"amount": case.amount, "unit": case.unit[0], "scale": case.unit[1],
                    "roofline_GFLOPs": roofline if flops else None})
    row.notes += [f"{case.op}: torch-reference is {case.describe['baseline']}"] + (
        [case.note] if case.note else [])
    ours, ref = case.outputs()
    row.checks["torch-reference"] = {"max_abs_diff_vs_sdfast": _max_diff(ours, ref),
                                     "max_abs_sdfast": float(ours.abs().max())}
    inner = K.inner_count(case.baseline, bench.device)
    bench.measure(row, {"sdfast": K.per_call(case.run(None), inner, bench.device),
                        "torch-reference": K.per_call(case.baseline, inner, bench.device)})
    return row


def suite_unet(bench):
    import torch

    r, b = bench.resolution, bench.batch
    row = bench.row("unet", f"UNet step {r}x{r}, batch {b} (CFG: {2 * b} rows)")
    handles = bench.loaded(row)
    sdfast_pipe = handles["sdfast"][1]
    gen = torch.Generator().manual_seed(SEED)
    ctx_dim = sdfast_pipe.unet.config.context_dim
    x = torch.randn(2 * b, 4, r // 8, r // 8, generator=gen).to(bench.device, bench.dtype)
    ctx = torch.randn(2 * b, 77, ctx_dim, generator=gen).to(bench.device, bench.dtype)
    t = torch.full((2 * b,), 500.0, device=bench.device)
    with torch.no_grad():
        outputs = {n: rt.unet(h, x, t, ctx) for n, (rt, h) in handles.items()}
        runners = {n: timed(lambda rt=rt, h=h: rt.unet(h, x, t, ctx), bench.device)
                   for n, (rt, h) in handles.items()}
        bench.measure(row, runners)
    ref = outputs["sdfast"]
    for name, out in outputs.items():
        if name != "sdfast":
            row.checks[name] = {"max_abs_diff_vs_sdfast": _max_diff(out, ref),
                                "max_abs_sdfast": float(ref.abs().max())}
    return [row]


def _request(bench):
    return Request(PROMPT, NEGATIVE, bench.resolution, bench.resolution, bench.steps, CFG,
                   bench.batch, SEED)


def suite_e2e(bench):
    import numpy as np
    import torch

    req = _request(bench)
    row = bench.row("e2e", f"full image {req.width}x{req.height}, {req.steps} steps, batch "
                           f"{req.batch} (text encoder + UNet with CFG + VAE decode)")
    handles = bench.loaded(row)
    images = {}

    def runner(name, rt, h, request=req):
        def run():
            images[name] = rt.generate(h, request)
        return timed(run, bench.device)

    runners = {n: runner(n, rt, h) for n, (rt, h) in handles.items()}
    if bench.cache_interval:
        cached = replace(req, cache_interval=bench.cache_interval, cache_depth=bench.cache_depth)
        runners[CACHED] = runner(CACHED, *handles["sdfast"], cached)
    with torch.no_grad():
        samples = bench.sample(row, runners)
    cached_samples = samples.pop(CACHED, None)
    row.runs.update({name: Stats(values) for name, values in samples.items()})
    rows = [row]
    if cached_samples is not None:
        rows.append(_cached_row(bench, row, Stats(cached_samples), images))
    ref = [np.asarray(im, dtype=np.int16) for im in images["sdfast"]]
    for name, ims in images.items():
        if name != "sdfast" and name in row.runs:
            diff = max(int(np.abs(np.asarray(im, dtype=np.int16) - r_).max())
                       for im, r_ in zip(ims, ref))
            row.checks[name] = {"max_pixel_diff_vs_sdfast_0_255": diff}
    return rows


def _cached_row(bench, row, cached, images):
    """The e2e row of sdfast's generate with step caching: against the uncached generate
    (interleaved with it) and against every baseline's plain generate, and its image's PSNR
    against the uncached one (same prompt, noise and seed)."""
    import numpy as np
    import torch

    from .measure import psnr

    n = bench.cache_interval
    depth = "" if bench.cache_depth is None else f", cache_depth {bench.cache_depth}"
    out = bench.row("e2e", f"the same with step caching (cache_interval {n}{depth})")
    out.unavailable = dict(row.unavailable)
    out.goal = {"vs": UNCACHED, "at_least": CACHE_GOAL}
    out.runs = {"sdfast": cached, UNCACHED: row.runs["sdfast"],
                **{name: stats for name, stats in row.runs.items() if name != "sdfast"}}

    def tensor(ims):                          # PIL images -> [B, 3, H, W] in 0..1
        return torch.from_numpy(np.stack([np.asarray(im) for im in ims])).permute(0, 3, 1, 2) / 255.0

    db = psnr(tensor(images[CACHED]), tensor(images["sdfast"]))
    speedup = out.ratios()[UNCACHED]
    out.checks[UNCACHED] = {"speedup_vs_uncached": speedup, "psnr_db_vs_uncached": float(db.mean()),
                            "psnr_db_min": float(db.min())}
    out.notes.append(f"cache_interval {n}: x{speedup:.2f} faster than sdfast's uncached generate "
                     f"(interleaved in the same run), image PSNR {float(db.mean()):.1f} dB against "
                     "the uncached image; prompt adherence: bench/step_cache.py")
    return out


def suite_lora(bench):
    import torch
    from safetensors.torch import save_file

    from .loras import RANK, random_kohya_lora

    load_row = bench.row("lora", f"LoRA load + merge (kohya, rank {RANK}, UNet + text encoder; "
                                 "file not read before)")
    swap_row = bench.row("lora", "LoRA swap A -> B (both files read before)")
    swap_row.goal = None
    handles = bench.loaded(load_row)
    swap_row.unavailable.update(load_row.unavailable)
    pipe = handles["sdfast"][1]
    folder = os.path.join(bench.work_dir, "loras", bench.model.key)
    os.makedirs(folder, exist_ok=True)
    files = {}
    for label, seed in (("A", 1), ("B", 2)):
        files[label] = os.path.join(folder, f"{label}-rank{RANK}.safetensors")
        if not os.path.exists(files[label]):
            save_file(random_kohya_lora(pipe.unet, pipe.text_encoder, seed), files[label])
    load_row.notes.append(f"{_count_modules(files['A'])} modules, fp16 file of "
                          f"{os.path.getsize(files['A']) / 2 ** 20:.0f} MiB")
    copies = [0]

    def fresh_copy():                         # a new path: no side has read this file before
        copies[0] += 1
        path = os.path.join(folder, f"A-copy{copies[0]}.safetensors")
        shutil.copyfile(files["A"], path)
        return path

    def load_runner(rt, h):
        def run():
            path = fresh_copy()
            try:
                return timed(lambda: rt.lora_load(h, path, "A"), bench.device)()
            finally:
                rt.lora_reset(h)
                os.remove(path)
        return run

    def swap_runner(rt, h):
        def run():
            rt.lora_swap_setup(h, files["A"], files["B"])
            try:
                return timed(lambda: rt.lora_swap(h, files["B"]), bench.device)()
            finally:
                rt.lora_reset(h)
        return run

    with torch.no_grad():
        _lora_check(bench, handles, files["A"], load_row)
        bench.measure(load_row, {n: load_runner(rt, h) for n, (rt, h) in handles.items()})
        bench.measure(swap_row, {n: swap_runner(rt, h) for n, (rt, h) in handles.items()})
    return [load_row, swap_row]


def _lora_check(bench, handles, path, row):
    """After merging A, each side's UNet and text encoder must agree with sdfast's (and the
    LoRA must change them: its effect is recorded beside the difference)."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    ctx_dim = handles["sdfast"][1].unet.config.context_dim
    x = torch.randn(2, 4, 8, 8, generator=gen).to(bench.device, bench.dtype)
    ctx = torch.randn(2, 77, ctx_dim, generator=gen).to(bench.device, bench.dtype)
    t = torch.tensor([500.0, 20.0], device=bench.device)
    ids = torch.randint(1, 49000, (2, 77), generator=gen).to(bench.device)

    def outputs(rt, h):
        return rt.unet(h, x, t, ctx), rt.text(h, ids)

    outs = {}
    for name, (rt, h) in handles.items():
        base = outputs(rt, h)
        try:
            rt.lora_load(h, path, "A")
            outs[name] = (outputs(rt, h), base)
        except Exception as exc:
            if name == "sdfast":
                raise
            row.unavailable[name] = f"failed: {type(exc).__name__}: {exc}"
        finally:
            rt.lora_reset(h)
    (ref_unet, ref_text), (base_unet, base_text) = outs["sdfast"]
    for name, ((unet, text), _) in outs.items():
        if name != "sdfast":
            row.checks[name] = {"unet_max_abs_diff_vs_sdfast": _max_diff(unet, ref_unet),
                                "unet_lora_effect": _max_diff(ref_unet, base_unet),
                                "text_max_abs_diff_vs_sdfast": _max_diff(text, ref_text),
                                "text_lora_effect": _max_diff(ref_text, base_text)}


def _count_modules(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return sum(1 for key in fh.keys() if key.endswith(".alpha"))


# ----------------------------------------------------------------------------- child suites
def _child(bench, task, name, **extra):
    """Run one measurement in a fresh interpreter (`sdfast.bench.child`); its JSON result."""
    import sdfast

    root = os.path.dirname(os.path.dirname(os.path.abspath(sdfast.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    import torch

    spec = {"task": task, "runtime": name, "model": asdict(bench.model), "path": bench.path(name),
            "device": str(bench.device), "dtype": str(bench.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), **extra}
    proc = subprocess.run([sys.executable, "-m", "sdfast.bench.child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise RuntimeError(f"child process: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _warm_page_cache(path):
    """Read every file of the model once, so that no side pays the disk and both start warm."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path)
                                                 for f in fs]
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _child_rows(bench, task, rows, warmup):
    """Interleaved child runs of `task`; `rows` maps a key of the child's result to its Row
    (the first row collects what is unavailable)."""
    first = next(iter(rows.values()))
    names = [n for n in bench.runtimes if n not in first.unavailable]
    for name in names:
        try:
            _warm_page_cache(bench.path(name))
        except Exception as exc:
            first.unavailable[name] = f"failed: {type(exc).__name__}: {exc}"
    extra = {"request": asdict(_request(bench))} if task == "memory" else {}
    runners = {n: (lambda n=n: _child(bench, task, n, **extra)) for n in names}
    results = bench.sample(first, runners, warmup)
    for key, row in rows.items():
        row.unavailable.update(first.unavailable)
        for name, samples in results.items():
            row.runs[name] = Stats([sample[key] for sample in samples])
    return list(rows.values())


def suite_load(bench):
    label = "single file" if os.path.isfile(bench.model.checkpoint) else "diffusers folder"
    rows = {"total_s": bench.row("load", f"cold load of the {label} in a fresh process: imports "
                                          "+ load to a ready pipeline"),
            "load_s": bench.row("load", "the load call alone (imports done)"),
            "page_in_s": bench.row("load", "first read of every weight after the load "
                                           "(page faults of the mapped file)")}
    warmup = max(1, bench.warmup)
    for key, row in rows.items():
        if key != "total_s":
            row.goal = None
        row.unavailable["torch-reference"] = "not applicable: loading runs no ops"
    rows["total_s"].notes.append(
        f"page cache warm for every side: the files are read once, then {warmup} untimed "
        "load(s) per side")
    return _child_rows(bench, "load", rows, warmup)


def suite_memory(bench):
    req = _request(bench)
    row = bench.row("memory", f"peak resident memory: load + one {req.width}x{req.height} "
                              f"generate ({req.steps} steps, batch {req.batch}), fresh process",
                    unit="MiB", kind="memory")
    row.notes.append("peak resident memory of the process, VmHWM (mapped weight pages count once "
                     "touched)")
    return _child_rows(bench, "memory", {"peak_rss_mib": row}, warmup=0)


SUITE_FUNCTIONS = {"kernels": suite_kernels, "unet": suite_unet, "e2e": suite_e2e,
                   "lora": suite_lora, "load": suite_load, "memory": suite_memory}
