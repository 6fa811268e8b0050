"""Measuring: interleaved repeats after warm-up, medians with their spread, and the machine.

`interleave(runners, repeats, warmup)` calls each runner `warmup` times, then `repeats` rounds
in which every runner runs once, the order rotating by one each round (A B C, B C A, C A B):
a slow spell of a shared machine then lands on every side alike, not on whichever ran last.
A runner returns its measurement (seconds, bytes, ...); `timed(fn)` makes one from a callable.
"""
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

GIT_TIMEOUT_S = 5          # each git call of `git_commit`; past it the commit is left out


@dataclass
class Stats:
    """Summary of one runner's samples: median, quartiles (IQR), min, max."""

    samples: list = field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.samples)

    def quartiles(self):
        """`(q1, q3)`; with fewer than 3 samples, the min and max."""
        if len(self.samples) < 3:
            return min(self.samples), max(self.samples)
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    def as_dict(self):
        q1, q3 = self.quartiles()
        return {"median": self.median, "q1": q1, "q3": q3, "min": min(self.samples),
                "max": max(self.samples), "n": len(self.samples), "samples": list(self.samples)}


def sync(device):
    """Wait for queued device work (CUDA kernels run asynchronously)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, device="cpu"):
    """A runner: seconds one call of `fn` takes, device work included."""
    def run():
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    return run


def interleave(runners, repeats, warmup, progress=None):
    """`{name: [value, ...]}` of `runners` (`{name: () -> value}`), measured in rotating order.
    `progress(name, round)` is told before each call (round -1 for warm-up)."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            if progress:
                progress(name, -1)
            runners[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if progress:
                progress(name, r)
            samples[name].append(runners[name]())
    return samples


def psnr(a, b):
    """Per-image PSNR in dB of `[B, C, H, W]` images in 0..1."""
    import torch

    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """The machine and software a run measured: CPU, cores, memory, load, versions, GPU."""
    import torch

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _git(root, *args, timeout=GIT_TIMEOUT_S):
    """stdout of `git -C root ARGS` (stripped), or None when git is missing, fails or hangs."""
    try:
        proc = subprocess.run(["git", "--no-optional-locks", "-C", root, *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(root=None):
    """The commit of the git checkout sdfast runs from: the short hash, plus "+dirty" when
    tracked files have uncommitted changes; None when sdfast is not in a checkout (an installed
    package) or git is missing or slow. Never raises."""
    if root is None:
        import sdfast

        root = os.path.dirname(os.path.dirname(os.path.abspath(sdfast.__file__)))
    top = _git(root, "rev-parse", "--show-toplevel")
    # The checkout must be sdfast's own, not a repository that merely contains an installed copy
    # (a virtual environment inside some other checkout).
    if not top or os.path.realpath(top) != os.path.realpath(root):
        return None
    commit = _git(root, "rev-parse", "--short", "HEAD")
    if not commit:
        return None
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    if changes is None:
        return None                      # clean or dirty unknown: leave the commit out
    return commit + ("+dirty" if changes else "")


def versions():
    """Versions of the libraries the suite compares, and the git commit of sdfast's checkout
    (`commit`, only when it runs from one; see `git_commit`)."""
    from importlib import metadata

    import sdfast

    out = {"sdfast": sdfast.__version__}
    commit = git_commit()
    if commit:
        out["commit"] = commit
    for dist in ("torch", "diffusers", "transformers", "peft", "safetensors", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
