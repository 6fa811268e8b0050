"""`sdfast train METHOD ...` and `python -m sdfast.train METHOD ...`: argparse wiring.

`register(subparsers)` adds the `train` command to sdfast's parser; `main(argv)` is the
stand-alone entry point (also for `accelerate launch -m sdfast.train METHOD ...` and
`torchrun -m sdfast.train ...`). Every method shares the common flags; flags are the keyword
arguments of its `train_*` function with dashes, and their defaults are read from it.
"""
import argparse
import importlib
import inspect
import math
import os

from ..cli import _Parser
from ..errors import SdfastError
from .common import LR_SCHEDULERS, MIXED_PRECISIONS, OPTIMIZERS, SAVE_PRECISIONS

_POSITIONAL = ("model", "dataset_config", "output_dir", "output_name")


def _number(kind, low, inclusive=True):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is float and not math.isfinite(value):      # nan passes every comparison
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {low}, got {value}")
        return value
    return parse


def _defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _add_common(p, d):
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
    p.add_argument("--debiased-estimation-loss", action="store_true",
                   help="weight each timestep's loss by 1/sqrt(SNR) (kohya's option)")
    p.add_argument("--min-timestep", type=_number(int, 0), default=0,
                   help="train on timesteps from this one (kohya's --min_timestep)")
    p.add_argument("--max-timestep", type=_number(int, 1), default=None,
                   help="and below this one (default: all 1000)")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode every image once, keep the latents in memory")
    p.add_argument("--cache-latents-to-disk", nargs="?", const=True, default=False,
                   metavar="DIR", help="also keep them on disk (DIR, default "
                   "OUTPUT_DIR/latent-cache), read back by a resumed or later run")
    p.add_argument("--latents", choices=("sample", "mean"), default=d["latents"],
                   help="VAE posterior sample or mean")
    p.add_argument("--num-workers", type=_number(int, 0), default=d["num_workers"],
                   help="data loader worker processes")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _text_encoder_flags(p, d):
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--text-encoder-lr", type=_number(float, 0, False), default=None)


def _prior_flag(p, d):
    p.add_argument("--prior-loss-weight", type=_number(float, 0), default=d["prior_loss_weight"],
                   help="loss weight of the is_reg (class) images")


def _finetune_flags(p, d):
    _text_encoder_flags(p, d)
    p.add_argument("--train-vae", action="store_true", help="train only the VAE (autoencoder)")
    p.add_argument("--vae-loss", choices=("l1", "mse"), default=d["vae_loss"])
    p.add_argument("--kl-weight", type=_number(float, 0), default=d["kl_weight"])
    p.add_argument("--vae-foreground-weight", type=_number(float, 0),
                   default=d["vae_foreground_weight"],
                   help="extra VAE loss weight on pixels unlike the image's border colour")
    p.add_argument("--vae-edge-weight", type=_number(float, 0), default=d["vae_edge_weight"],
                   help="extra VAE loss weight on the outline of that foreground")
    p.add_argument("--vae-crop", type=_number(int, 8), default=None,
                   help="train the VAE on CROP x CROP windows around the foreground")


def _lora_flags(p, d):
    p.add_argument("--network-dim", type=_number(int, 1), default=d["network_dim"],
                   help="LoRA rank")
    p.add_argument("--network-alpha", type=_number(float, 0, False), default=d["network_alpha"],
                   help="LoRA alpha (scale alpha / rank)")
    p.add_argument("--conv-dim", type=_number(int, 1), default=None,
                   help="LoCon: rank of the res-block 3x3 convs (default: none)")
    p.add_argument("--conv-alpha", type=_number(float, 0, False), default=d["conv_alpha"])
    p.add_argument("--unet-lr", type=_number(float, 0, False), default=None)
    p.add_argument("--text-encoder-lr", type=_number(float, 0, False), default=None)
    p.add_argument("--network-train-unet-only", action="store_true")
    p.add_argument("--network-train-text-encoder-only", action="store_true")
    _prior_flag(p, d)
    p.add_argument("--training-comment", default=None, help="stored as ss_training_comment")


def _textual_inversion_flags(p, d):
    p.add_argument("--token-string", required=True, help="the new word (must be in captions)")
    p.add_argument("--init-word", default=d["init_word"], help="start from this word's tokens")
    p.add_argument("--num-vectors-per-token", type=_number(int, 1),
                   default=d["num_vectors_per_token"])


def _dreambooth_flags(p, d):
    _prior_flag(p, d)
    p.add_argument("--num-class-images", type=_number(int, 0), default=d["num_class_images"],
                   help="fill is_reg folders to this many images with the model's own")
    p.add_argument("--class-sample-steps", type=_number(int, 1), default=d["class_sample_steps"])
    _text_encoder_flags(p, d)


# name: (module, function, help, method-specific flags)
METHODS = {
    "finetune": ("finetune", "train_finetune",
                 "fine-tune the UNet (+ text encoder), or train the VAE", _finetune_flags),
    "lora": ("lora", "train_lora", "train a LoRA / LoCon (kohya format)", _lora_flags),
    "textual-inversion": ("textual_inversion", "train_textual_inversion",
                          "learn an embedding for a new word", _textual_inversion_flags),
    "dreambooth": ("dreambooth", "train_dreambooth",
                   "DreamBooth with prior preservation (class images)", _dreambooth_flags),
    "controlnet": ("controlnet", "train_controlnet", "train a ControlNet for a frozen model",
                   lambda p, d: None),
}


def _function(method):
    module, name = METHODS[method][:2]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def add_method_parser(sub, method):
    """The `method` sub-command (a key of METHODS) on an argparse sub-parsers object."""
    _, _, help_text, extra = METHODS[method]
    d = _defaults(_function(method))
    p = sub.add_parser(method, help=help_text)
    _add_common(p, d)
    extra(p, d)
    p.set_defaults(func=_run, method=method)
    return p


def add_finetune_parser(sub):
    """The `finetune` sub-command on an argparse sub-parsers object."""
    return add_method_parser(sub, "finetune")


def _run(args):
    function = _function(args.method)
    names = [n for n in inspect.signature(function).parameters
             if n not in _POSITIONAL and n != "progress"]
    kwargs = {name: getattr(args, name) for name in names if hasattr(args, name)}
    kwargs["progress"] = not args.quiet
    result = function(*(getattr(args, name) for name in _POSITIONAL), **kwargs)
    if os.environ.get("RANK", "0") == "0":         # one line each, also under torchrun
        for path in result.outputs:
            print(path)
    return 0


def _no_method(args):
    raise SdfastError("train: a method is required: " + ", ".join(METHODS))


def _add_methods(sub):
    for method in METHODS:
        add_method_parser(sub, method)


def register(subparsers):
    """Add `train` (with its method sub-commands) to sdfast's sub-parsers."""
    p = subparsers.add_parser("train", help="train: " + ", ".join(METHODS))
    _add_methods(p.add_subparsers(dest="method", parser_class=_Parser))
    p.set_defaults(func=_no_method)
    return p


def main(argv=None):
    """`python -m sdfast.train METHOD ...`; returns the exit code (2 on bad input)."""
    from ..cli import run_parser

    parser = _Parser(prog="python -m sdfast.train", description="Train Stable Diffusion models.")
    _add_methods(parser.add_subparsers(dest="method", parser_class=_Parser))
    return run_parser(parser, argv, what="method")


__all__ = ["register", "add_method_parser", "add_finetune_parser", "main", "METHODS"]
