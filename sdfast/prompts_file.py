"""`sdfast generate --prompts-file F`: a list of prompts rendered once, shared by processes.

F holds one prompt per line (blank lines are skipped; prompt i is the i-th non-blank line,
0-based). Under `torchrun` or `accelerate launch` (the `RANK` / `WORLD_SIZE` environment they
set), process r renders prompts r, r + n, ...; alone it renders all of them. Prompt i is
generated with seed `seed + i` and saved as `OUT-iiiii.png` (`OUT-iiiii-b.png` for the b-th
image of a batch), so the images depend neither on the number of processes nor on which one
renders them, and a cluster renders a prompt list once. No process group is needed: the
sharding is by index.
"""
import os

from .errors import SdfastError


def read_prompts(path):
    """The prompts of `path`, one per non-blank line."""
    try:
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh]
    except FileNotFoundError:
        raise SdfastError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SdfastError(f"{path}: cannot read the prompts file ({exc})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SdfastError(f"{path}: the prompts file holds no prompt")
    return prompts


def process_rank(environ=os.environ):
    """`(rank, world size)` from torchrun / accelerate's environment, `(0, 1)` alone."""
    try:
        rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SdfastError("RANK / WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise SdfastError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world


def process_device(device, environ=os.environ):
    """The device of this process: `device` when given, else `cuda:LOCAL_RANK` under a launcher
    with CUDA (one GPU per process), else sdfast's default."""
    import torch

    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in environ:
        return f"cuda:{int(environ['LOCAL_RANK'])}"
    return device


def indexed_paths(output, index, batch):
    """Output paths of prompt `index`: `OUT-iiiii.png`, or `OUT-iiiii-b.png` per batch image."""
    stem, ext = os.path.splitext(output)
    ext = ext or ".png"
    if batch == 1:
        return [f"{stem}-{index:05d}{ext}"]
    return [f"{stem}-{index:05d}-{b}{ext}" for b in range(batch)]


def my_prompts(prompts, output, batch, overwrite, environ=os.environ):
    """`[(index, prompt, paths)]` this process renders. Without `overwrite`, a taken output
    name is an error before anything is rendered."""
    rank, world = process_rank(environ)
    jobs = [(i, prompts[i], indexed_paths(output, i, batch))
            for i in range(rank, len(prompts), world)]
    if not overwrite:
        for _, _, paths in jobs:
            for path in paths:
                if os.path.exists(path):
                    raise SdfastError(f"{path}: exists (use --overwrite to replace it)")
    return jobs


__all__ = ["read_prompts", "process_rank", "process_device", "indexed_paths", "my_prompts"]
