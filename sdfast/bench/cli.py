"""`sdfast bench`: the command line of the benchmark suite.

`register(subparsers)` adds the command to sdfast's parser (`sdfast/cli.py` calls it). Every
argument is checked before a model is built or anything is measured or written; bad input is
one line on stderr and exit 2, like every sdfast command. Existing output files are refused
unless `--overwrite`.
"""
import os
import shlex
import sys
import time

from ..errors import SdfastError
from ..io.save import check_folder, make_folder
from .arch import ARCHS
from .runtimes import BASELINES, RUNTIMES
from .suites import SUITES

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_COMPARE = "diffusers,torch-reference,onnxruntime"


def default_work_dir():
    return os.environ.get("SDFAST_BENCH_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "sdfast", "bench")


def register(subparsers):
    """Add `bench` to an argparse sub-parsers action."""
    from ..cli import _int_at_least, _positive_int, _positive_multiple_of_8

    p = subparsers.add_parser("bench", help="time sdfast against diffusers and other baselines "
                                            "in the same run")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=ARCHS,
                        help="random weights at these shapes, no download (default: builtin)")
    source.add_argument("--model", help="time a real checkpoint file or diffusers folder")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--resolution", type=_positive_multiple_of_8, default=512,
                   help="image side in pixels (unet, e2e, memory)")
    p.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (e2e, memory)")
    p.add_argument("--batch", type=_positive_int, default=1,
                   help="images per prompt; the UNet runs twice as many rows (CFG)")
    p.add_argument("--suite", default="all",
                   help=f"comma-separated: {', '.join(SUITES)} or all (default: all)")
    p.add_argument("--compare", default=DEFAULT_COMPARE,
                   help=f"comma-separated baselines: {', '.join(BASELINES)}, or none "
                        f"(default: {DEFAULT_COMPARE})")
    p.add_argument("--cache-interval", type=_int_at_least(2), default=None, metavar="N",
                   help="e2e: also time sdfast's generate with step caching every N steps "
                        "(its speed-up over the uncached generate and its image's PSNR)")
    p.add_argument("--cache-depth", type=_positive_int, default=None, metavar="D",
                   help="with --cache-interval: the input blocks (and their output blocks) a cached step "
                        "recomputes (generate's cache_depth; default: its default)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1,
                   help="untimed rounds first (default 1; the load suite runs at least one)")
    p.add_argument("--json", metavar="OUT.json", help="write the full record as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="write a bar chart")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--work-dir", default=None,
                   help="where built models and LoRAs are cached (default: $SDFAST_BENCH_DIR "
                        "or ~/.cache/sdfast/bench)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads for every side (default: torch's choice). On a "
                        "machine shared with other work, 1 avoids OpenMP threads waiting on "
                        "descheduled siblings")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_bench)
    return p


def _list(text, valid, flag, extra=()):
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item not in valid and item not in extra:
            raise SdfastError(f"{flag}: unknown {item!r}; choose from "
                              f"{', '.join(list(valid) + list(extra))}")
    return items


def check_args(args):
    """Validate everything before work starts; fills the defaults that depend on the device."""
    import torch

    suites = _list(args.suite, SUITES, "--suite", ("all",))
    if not suites:
        raise SdfastError("--suite: name at least one suite")
    args.suites = list(SUITES) if "all" in suites else [s for s in SUITES if s in suites]
    compare = _list(args.compare, BASELINES, "--compare", ("none",))
    args.baselines = [b for b in BASELINES if b in compare]
    if args.cache_interval is not None and "e2e" not in args.suites:
        raise SdfastError("--cache-interval: only the e2e suite uses it (add e2e to --suite)")
    if args.cache_depth is not None and args.cache_interval is None:
        raise SdfastError("--cache-depth needs --cache-interval")
    if not 0 <= args.seed < 2 ** 63:
        raise SdfastError(f"--seed {args.seed}: the random weights' seed must be in 0..2**63-1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SdfastError("--device cuda: no CUDA device is available here")
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    if args.model is not None and not os.path.exists(args.model):
        raise SdfastError(f"{args.model}: no such file or directory")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and os.path.isdir(path):
            raise SdfastError(f"{flag} {path}: is a folder")
        if path and os.path.lexists(path) and not args.overwrite:
            raise SdfastError(f"{flag} {path}: exists (pass --overwrite to replace it)")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise SdfastError(f"--plot {args.plot}: the chart is a PNG file (name it .png)")
    args.work_dir = args.work_dir or default_work_dir()
    check_folder(args.work_dir, "--work-dir")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:                       # every flag checked: now the output folders, like -o
            _output_folder(path, flag)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    return args


def _output_folder(path, flag):
    """Create the folder of an output file before any work (as `generate -o` does); a path
    through a file, a folder that cannot be made or written is an error."""
    folder = os.path.dirname(os.path.abspath(path))
    check_folder(folder, flag, shown=path)
    make_folder(folder, flag, shown=path)


def command_line(args):
    """The run as one explicit command (every setting spelled out)."""
    parts = ["sdfast", "bench", *(["--model", args.model] if args.model else ["--arch", args.arch])]
    parts += ["--device", args.device, "--dtype", args.dtype, "--resolution", str(args.resolution),
              "--steps", str(args.steps), "--batch", str(args.batch),
              "--suite", ",".join(args.suites), "--compare", ",".join(args.baselines) or "none",
              "--repeats", str(args.repeats), "--warmup", str(args.warmup),
              "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.cache_interval is not None:
        parts += ["--cache-interval", str(args.cache_interval)]
    if args.cache_depth is not None:
        parts += ["--cache-depth", str(args.cache_depth)]
    return shlex.join(parts)


def _bench(args):
    check_args(args)
    args.arch = args.arch or (None if args.model else "builtin")
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    record, rows, names = run(args, log)
    from .report import plot, table, write_json

    print(table(record, rows, names))
    if args.json:
        write_json(record, args.json, overwrite=args.overwrite)
        print(args.json)
    if args.plot:
        plot(rows, names, f"sdfast bench: {record['model']['label']} ({args.device}, {args.dtype})",
             args.plot, overwrite=args.overwrite)
        print(args.plot)
    return 0


def run(args, log):
    """Build the model, run the suites; `(record, rows, runtime names)`."""
    import torch

    from .arch import ensure_model, model_files
    from .measure import machine, versions
    from .suites import SUITE_FUNCTIONS, Bench

    names = ["sdfast", *args.baselines]
    runtimes = {name: RUNTIMES[name]() for name in names}
    if "kernels" in args.suites and "torch-reference" not in names:
        names.append("torch-reference")          # the kernels suite's baseline is always torch
    unavailable = {n: why for n, rt in runtimes.items() if (why := rt.unavailable(args.device))}
    make_folder(args.work_dir, "--work-dir")
    model = (model_files(args.model, args.work_dir) if args.model
             else ensure_model(args.arch, args.work_dir, seed=args.seed, log=log))
    record = {"schema": 1, "command": command_line(args), "argv": sys.argv,
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "machine": machine(args.device), "versions": versions(),
              "settings": {k: getattr(args, k) for k in ("device", "dtype", "resolution", "steps",
                                                         "batch", "repeats", "warmup", "threads", "seed",
                                                         "suites", "baselines", "cache_interval",
                                                         "cache_depth")},
              "model": {"label": model.label, "family": model.family,
                        "prediction": model.prediction, "arch": args.arch,
                        "path": model.checkpoint}}
    bench = Bench(model, runtimes, unavailable, args.device, getattr(torch, DTYPES[args.dtype]),
                  args.resolution, args.steps, args.batch, args.repeats, args.warmup,
                  args.work_dir, log, cache_interval=args.cache_interval,
                  cache_depth=args.cache_depth)
    rows = []
    for suite in args.suites:
        if suite in ("load", "memory"):
            bench.release()                   # fresh processes: leave them the memory
        log(f"suite {suite} ...")
        rows += SUITE_FUNCTIONS[suite](bench)
    bench.release()
    record["rows"] = [row.as_dict() for row in rows]
    if hasattr(os, "getloadavg"):
        record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return record, rows, names
