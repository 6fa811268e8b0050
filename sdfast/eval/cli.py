"""`sdfast eval shapes`: the command line of the shapes evaluator (`shapes_eval.py`).

`register(subparsers)` adds the `eval` command to sdfast's parser (`sdfast/cli.py` calls it);
its parsers are sdfast's `_Parser`, so a usage error is one line and exit 2 like every command.
Argument checks run before the model is loaded and before anything is generated or written.
"""
import os

from ..data.shapes import SPLITS
from ..errors import SdfastError


def register(subparsers):
    """Add `eval` (with its `shapes` sub-command) to an argparse sub-parsers action."""
    from ..cli import _Parser

    p = subparsers.add_parser("eval", help="score a model on prompts it must follow")
    p.set_defaults(func=_missing_subcommand)
    sub = p.add_subparsers(dest="eval_command", parser_class=_Parser)
    _add_shapes(sub)
    return p


def _add_shapes(sub):
    from ..cli import _positive_int, add_cache_options

    p = sub.add_parser("shapes", help="prompt-following accuracy on the shapes dataset "
                                      "(held-out combinations by default)")
    p.add_argument("--model", default=None,
                   help="checkpoint file or diffusers folder (default: the built-in model)")
    p.add_argument("--n", type=_positive_int, default=200, help="number of prompts (images)")
    p.add_argument("--seed", type=int, default=0,
                   help="selects the prompts; prompt i is generated with seed + i")
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--batch", type=_positive_int, default=16,
                   help="prompts sampled together (does not change the images)")
    p.add_argument("--split", choices=SPLITS, default="heldout")
    p.add_argument("--variety", action="store_true",
                   help="varied captions (may omit size, position or background)")
    add_cache_options(p)
    p.add_argument("--json", metavar="OUT.json", help="also write the full result as JSON")
    p.add_argument("--save-images", metavar="DIR", help="also save the images as PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_shapes)


def _missing_subcommand(args):
    raise SdfastError("eval needs a sub-command: shapes")


def _model_path(model):
    """The checkpoint to evaluate: `--model`, or the built-in model when it is installed."""
    from ..builtin import resolve_model

    if model is not None and not os.path.exists(model):
        raise SdfastError(f"{model}: no such file or directory")
    return resolve_model(model)


def _writable(folder, flag, path):
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SdfastError(f"{flag} {path}: {folder} is not writable")


def _check_outputs(args):
    """Refuse outputs that would be overwritten or cannot be written, before loading or
    generating anything."""
    for flag, value in (("--json", args.json), ("--save-images", args.save_images)):
        if value == "":
            raise SdfastError(f"{flag}: empty path")
    if args.json:
        if os.path.isdir(args.json):
            raise SdfastError(f"--json {args.json}: is a directory (name a file)")
        if os.path.lexists(args.json) and not args.overwrite:
            raise SdfastError(f"{args.json}: exists (use --overwrite to replace it)")
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise SdfastError(f"{parent}: no such directory")
        _writable(parent, "--json", args.json)
    if args.save_images:
        # The nearest existing folder of --save-images (evaluate creates the rest).
        probe = os.path.abspath(args.save_images)
        while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            if probe == os.path.abspath(args.save_images):
                raise SdfastError(f"{args.save_images}: not a directory")
            raise SdfastError(f"--save-images {args.save_images}: {probe} is not a directory")
        _writable(probe, "--save-images", args.save_images)


def _shapes(args):
    from .. import load
    from .shapes_eval import check_settings, evaluate, format_table, write_json

    check_settings(args.n, args.seed, args.steps, args.cfg, args.sampler, args.scheduler,
                   args.batch, args.split)
    if args.cache_depth is not None and args.cache_interval == 1:
        raise SdfastError("--cache-depth needs --cache-interval")
    _check_outputs(args)
    path = _model_path(args.model)
    pipe = load(path, device=args.device)
    result = evaluate(pipe, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg,
                      sampler=args.sampler, scheduler=args.scheduler, batch_size=args.batch,
                      split=args.split, variety=args.variety, progress=not args.quiet,
                      save_images=args.save_images, overwrite=args.overwrite,
                      cache_interval=args.cache_interval, cache_depth=args.cache_depth)
    print(format_table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json, overwrite=args.overwrite)}")
    return 0
