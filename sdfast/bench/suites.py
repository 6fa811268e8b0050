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
- kernels: the per-op suite is bench/kernels.py; it is not wired into `sdfast bench` yet.
"""
import json
import os
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
KERNELS_HOOK = ("not yet wired: the per-op kernel suite is bench/kernels.py (issue 4); "
                "`sdfast bench --suite kernels` will run it once that lands")
# Speed-up goals (x faster than the baseline) and the memory goal (x of the baseline's peak).
GOALS = {"unet": {"vs": "diffusers", "at_least": 1.5}, "e2e": {"vs": "diffusers", "at_least": 1.5},
         "load": {"vs": "diffusers", "at_least": 3.0}, "lora": {"vs": "diffusers", "at_least": 5.0},
         "memory": {"vs": "diffusers", "at_most": 0.8}}


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

    def goal_met(self):
        if not self.goal or self.goal["vs"] not in self.runs or "sdfast" not in self.runs:
            return None
        ratio = self.ratios()[self.goal["vs"]]
        return ratio >= self.goal["at_least"] if "at_least" in self.goal else ratio <= self.goal["at_most"]

    def as_dict(self):
        out = asdict(self)
        out["runs"] = {name: stats.as_dict() for name, stats in self.runs.items()}
        out["ratios"] = self.ratios()
        out["ratio_meaning"] = ("baseline / sdfast (x faster)" if self.kind == "time"
                                else "sdfast / baseline (fraction of the baseline's peak)")
        if self.goal:
            out["goal"] = {**self.goal, "met": self.goal_met()}
        return out


class Bench:
    """What every suite shares: settings, the runtimes, and in-process loaded models."""

    def __init__(self, model, runtimes, unavailable, device, dtype, resolution, steps, batch,
                 repeats, warmup, work_dir, log):
        self.model, self.runtimes, self.unavailable = model, runtimes, unavailable
        self.device, self.dtype = device, dtype
        self.resolution, self.steps, self.batch = resolution, steps, batch
        self.repeats, self.warmup, self.work_dir, self.log = repeats, warmup, work_dir, log
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
            if name == "sdfast":
                raise
            row.unavailable[name] = f"failed: {type(exc).__name__}: {exc}"
            return None
    return run


def _max_diff(a, b):
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------- suites
def suite_kernels(bench):
    return [Row("kernels", "per-op kernels", status=KERNELS_HOOK)]


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

    def runner(name, rt, h):
        def run():
            images[name] = rt.generate(h, req)
        return timed(run, bench.device)

    with torch.no_grad():
        bench.measure(row, {n: runner(n, rt, h) for n, (rt, h) in handles.items()})
    ref = [np.asarray(im, dtype=np.int16) for im in images["sdfast"]]
    for name, ims in images.items():
        if name != "sdfast" and name in row.runs:
            diff = max(int(np.abs(np.asarray(im, dtype=np.int16) - r_).max())
                       for im, r_ in zip(ims, ref))
            row.checks[name] = {"max_pixel_diff_vs_sdfast_0_255": diff}
    return [row]


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
    row.notes.append("ru_maxrss of the process (mapped weight pages count once touched)")
    return _child_rows(bench, "memory", {"peak_rss_mib": row}, warmup=0)


SUITE_FUNCTIONS = {"kernels": suite_kernels, "unet": suite_unet, "e2e": suite_e2e,
                   "lora": suite_lora, "load": suite_load, "memory": suite_memory}
