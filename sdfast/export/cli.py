"""`sdfast export onnx | tensorrt`: argparse wiring (`register(subparsers)`)."""
import argparse
import os

from ..errors import SdfastError


def register(subparsers):
    """Add `export` (with `onnx` and `tensorrt`) to sdfast's sub-parsers."""
    from ..cli import _Parser

    p = subparsers.add_parser("export", help="ONNX graphs and TensorRT engines")
    p.set_defaults(func=_missing_subcommand)
    sub = p.add_subparsers(dest="export_command", parser_class=_Parser)
    _add_onnx(sub)
    _add_tensorrt(sub)
    return p


def _missing_subcommand(args):
    raise SdfastError("export needs a target: onnx or tensorrt")


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_onnx(sub):
    from .onnx_export import DTYPES, MIN_OPSET

    p = sub.add_parser("onnx", help="the text encoder, UNet and VAE as ONNX graphs")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the built-in model)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--opset", type=_int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--dtype", default="fp32", help=f"{' or '.join(DTYPES)} (fp16: the UNet and ControlNets; the VAE and text "
                   "encoder stay fp32)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="also export this ControlNet (repeatable); the UNet gets residual inputs")
    p.add_argument("--control-inputs", action="store_true",
                   help="give the UNet ControlNet residual inputs without exporting a ControlNet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.set_defaults(func=_onnx)


def _onnx(args):
    from .onnx_export import check_options, export_onnx

    check_options(args.opset, args.dtype)
    if args.model is not None and not os.path.exists(args.model):
        raise SdfastError(f"{args.model}: no such file or directory")
    manifest = export_onnx(args.model, args.output, opset=args.opset, dtype=args.dtype,
                           controlnets=args.controlnet, overwrite=args.overwrite,
                           control_inputs=True if args.control_inputs else None)
    files = [g["file"] for g in manifest["graphs"].values()]
    files += [c["file"] for c in manifest["controlnets"].values()]
    for name in files:
        print(os.path.join(args.output, name))
    return 0


def _add_tensorrt(sub):
    p = sub.add_parser("tensorrt", help="TensorRT engines from an ONNX export")
    p.add_argument("--onnx", required=True, help="folder written by `sdfast export onnx`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--min", help="smallest image WxH (default: half the native size)")
    p.add_argument("--opt", help="image WxH to tune for (default: the native size)")
    p.add_argument("--max", help="largest image WxH (default: 1.5x the native size)")
    p.add_argument("--batch", default="1:1:4", help="images per call MIN:OPT:MAX (default 1:1:4)")
    p.add_argument("--max-chunks", type=_int, default=3,
                   help="longest prompt in 75-token chunks (default 3)")
    p.add_argument("--fp16", action="store_true", help="let TensorRT use fp16 kernels")
    p.add_argument("--refit", action="store_true", help="refittable UNet/text engines (LoRA)")
    p.add_argument("--overwrite", action="store_true", help="replace existing engines")
    p.set_defaults(func=_tensorrt)


def _tensorrt(args):
    from . import manifest as mf
    from .profiles import BuildShapes, default_shapes, parse_batch, parse_size
    from .profiles import compute_profiles
    from .tensorrt import _trt, build_engines, check_output

    # Every argument first (the output folder, the export, the shapes against it): none of
    # that needs TensorRT, and a bad one is the error to report even where it is missing.
    check_output(args.onnx, args.output)
    manifest = mf.read(args.onnx, "sdfast-onnx")
    base = default_shapes(manifest["native_size"], parse_batch(args.batch), args.max_chunks)
    shapes = BuildShapes(parse_size(args.min) if args.min else base.min_size,
                         parse_size(args.opt) if args.opt else base.opt_size,
                         parse_size(args.max) if args.max else base.max_size,
                         base.batch, base.max_chunks)
    compute_profiles(manifest, shapes)
    _trt()                                   # then a clear error where tensorrt is missing
    out = build_engines(args.onnx, args.output, shapes, fp16=args.fp16, refit=args.refit,
                        overwrite=args.overwrite)
    for engine in out["engines"].values():
        print(os.path.join(args.output, engine["file"]))
    return 0
