"""Shared pieces of the bench/ scripts: interleaved timing and the recorded result.

Timing is interleaved (A, B, C, A, B, C, ...) after one warm-up call of each, and reported as
medians with the min and max: on a machine shared with other jobs, a slow period then hits
every variant alike instead of one of them.
"""
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def interleaved(fns, repeats, sync=None):
    """`{name: {"median_s", "min_s", "max_s", "runs"}}` for `fns` ({name: callable}), each
    called once as warm-up and then `repeats` times in rotation. `sync` (e.g.
    torch.cuda.synchronize) runs before each clock read."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times.items()}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit():
    """The checkout's commit: short hash, "+dirty" with uncommitted changes to tracked files;
    None outside a checkout or without git (sdfast.bench.measure.git_commit)."""
    from sdfast.bench.measure import git_commit

    return git_commit(str(ROOT))


def machine(**extra):
    """The machine a result was measured on (platform, CPU, threads, the CPU kernels' ISA, the
    GPU when there is one), plus `extra`."""
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()}
    try:
        from sdfast import _C
        info["cpu_kernels_isa"] = _C.cpu_isa()
    except (ImportError, AttributeError):
        info["cpu_kernels_isa"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return {**info, **extra}


def write_result(out, script, argv, body, machine_info=None, versions=None):
    """Write `body` with the command, machine, versions (torch, sdfast, commit, and `versions`)
    and date to `out` (JSON); returns the whole record."""
    import sdfast

    argv = sys.argv[1:] if argv is None else argv
    commit = _git_commit()
    result = {"command": f"python bench/{script} " + " ".join(argv),
              "machine": machine_info or machine(),
              "versions": {"torch": torch.__version__, "sdfast": sdfast.__version__,
                           "python": platform.python_version(),
                           **({"commit": commit} if commit else {}), **(versions or {})},
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **body}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result
