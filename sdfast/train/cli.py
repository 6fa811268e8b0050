"""`sdfast train finetune ...` and `python -m sdfast.train finetune ...`: argparse wiring.

`register(subparsers)` adds the `train` command to sdfast's parser; `main(argv)` is the
stand-alone entry point (also for `accelerate launch -m sdfast.train finetune ...`). Flags are
the keyword arguments of `train_finetune` with dashes; their defaults are read from it.
"""
import argparse
import inspect
import os

from ..cli import _Parser
from ..errors import SdfastError
from .common import LR_SCHEDULERS, MIXED_PRECISIONS, OPTIMIZERS, SAVE_PRECISIONS


def _number(kind, low, inclusive=True):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low}, got {value}")
        return value
    return parse


def _finetune_defaults():
    from .finetune import train_finetune

    return {name: p.default for name, p in inspect.signature(train_finetune).parameters.items()
            if p.default is not inspect.Parameter.empty}


def add_finetune_parser(sub):
    """The `finetune` sub-command on an argparse sub-parsers object."""
    d = _finetune_defaults()
    p = sub.add_parser("finetune", help="fine-tune the UNet (+ text encoder), or train the VAE")
    p.add_argument("--model", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("--dataset-config", required=True, help="kohya dataset config (.toml)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--output-name", required=True, help="NAME of NAME.safetensors")
    p.add_argument("--max-train-steps", type=_number(int, 1), default=d["max_train_steps"])
    p.add_argument("--learning-rate", type=_number(float, 0, False), default=d["learning_rate"])
    p.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=d["lr_scheduler"])
    p.add_argument("--lr-warmup-steps", type=_number(int, 0), default=d["lr_warmup_steps"])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"])
    p.add_argument("--weight-decay", type=_number(float, 0), default=d["weight_decay"])
    p.add_argument("--max-grad-norm", type=_number(float, 0), default=d["max_grad_norm"],
                   help="gradient clipping (0: off)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=d["mixed_precision"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gradient-accumulation-steps", type=_number(int, 1),
                   default=d["gradient_accumulation_steps"])
    p.add_argument("--save-every-n-steps", type=_number(int, 1), default=None)
    p.add_argument("--save-precision", choices=tuple(SAVE_PRECISIONS), default=d["save_precision"])
    p.add_argument("--seed", type=_number(int, 0), default=d["seed"])
    p.add_argument("--resume", default=None, help="state folder, or output folder to continue")
    p.add_argument("--noise-offset", type=_number(float, 0), default=d["noise_offset"])
    p.add_argument("--min-snr-gamma", type=_number(float, 0, False), default=None,
                   help="Min-SNR loss weighting (5 is the paper's value)")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--text-encoder-lr", type=_number(float, 0, False), default=None)
    p.add_argument("--train-vae", action="store_true", help="train only the VAE (autoencoder)")
    p.add_argument("--vae-loss", choices=("l1", "mse"), default=d["vae_loss"])
    p.add_argument("--kl-weight", type=_number(float, 0), default=d["kl_weight"])
    p.add_argument("--vae-foreground-weight", type=_number(float, 0),
                   default=d["vae_foreground_weight"],
                   help="extra VAE loss weight on pixels unlike the image's border colour")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode every image once, keep the latents in memory")
    p.add_argument("--latents", choices=("sample", "mean"), default=d["latents"],
                   help="VAE posterior sample or mean")
    p.add_argument("--num-workers", type=_number(int, 0), default=d["num_workers"],
                   help="data loader worker processes")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune)
    return p


def _finetune(args):
    from .finetune import train_finetune

    kwargs = {name: getattr(args, name) for name in _finetune_defaults() if hasattr(args, name)}
    kwargs["progress"] = not args.quiet
    result = train_finetune(args.model, args.dataset_config, args.output_dir, args.output_name,
                            **kwargs)
    if os.environ.get("RANK", "0") == "0":         # one line, also under torchrun/accelerate
        print(result.output)
    return 0


def _no_method(args):
    raise SdfastError("train: a method is required: finetune")


def register(subparsers):
    """Add `train` (with its `finetune` sub-command) to sdfast's sub-parsers."""
    p = subparsers.add_parser("train", help="train: finetune (LoRA, DreamBooth, ... to come)")
    add_finetune_parser(p.add_subparsers(dest="method", parser_class=_Parser))
    p.set_defaults(func=_no_method)
    return p


def main(argv=None):
    """`python -m sdfast.train METHOD ...`; returns the exit code (2 on bad input)."""
    from ..cli import run_parser

    parser = _Parser(prog="python -m sdfast.train", description="Train Stable Diffusion models.")
    add_finetune_parser(parser.add_subparsers(dest="method", parser_class=_Parser))
    return run_parser(parser, argv, what="method")


__all__ = ["register", "add_finetune_parser", "main"]
