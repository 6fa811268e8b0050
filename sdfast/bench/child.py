"""One measurement in a fresh process, for the load and memory suites:

    python -m sdfast.bench.child '{"task": "load" | "memory", "runtime": ..., "model": {...}, ...}'

prints one JSON line with what it measured. `load`: seconds to import the library (torch
included), to load the model into a ready pipeline, and to page in every weight once (one read
per 4 KiB page: both sides map the file lazily, so the first pass over the weights costs page
faults that a timed load alone would hide). `memory`: the same load, one `generate`, and the
process's peak resident memory (VmHWM; on CUDA also torch's peak allocation).
"""
import json
import resource
import sys
import time


def _rss_mib():
    with open("/proc/self/statm", encoding="ascii") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mib():
    """The peak resident memory of this process's own address space (Linux: VmHWM).
    Not `ru_maxrss`: on Linux it survives fork and exec, so a child started by a bench process
    that holds loaded models would report at least that parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024                   # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB


def page_in(modules):
    """Read one element of every 4 KiB page of every parameter (and return a checksum)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                step = max(1, 4096 // p.element_size())
                total += float(p.detach().reshape(-1)[::step].float().sum())
    return total


def run(spec):
    from .measure import sync
    from .runtimes import RUNTIMES, ModelFiles, Request

    runtime = RUNTIMES[spec["runtime"]]()
    model = ModelFiles(**spec["model"])
    start = time.perf_counter()
    runtime.imports()
    imported = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    handle = runtime.load(model, spec["path"], spec["device"], dtype)
    sync(spec["device"])
    loaded = time.perf_counter()
    out = {"import_s": imported - start, "load_s": loaded - imported,
           "total_s": loaded - start, "rss_after_load_mib": _rss_mib()}
    if spec["task"] == "load":
        page_in(runtime.weights(handle))
        out["page_in_s"] = time.perf_counter() - loaded
    else:
        if spec["device"].startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            runtime.generate(handle, Request(**spec["request"]))
        sync(spec["device"])
        out["generate_s"] = time.perf_counter() - loaded
        if spec["device"].startswith("cuda"):
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
