"""Pieces every training method shares: the accelerator, optimizers, learning-rate schedules,
per-step random generators, gradient checkpointing and trainable copies of loaded weights."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..errors import SdfastError

OPTIMIZERS = ("adamw", "adamw8bit-if-available", "sgd")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}

# Blocks that gradient checkpointing recomputes (UNet, VAE and text-encoder blocks by class name).
CHECKPOINTED_BLOCKS = ("TimestepEmbedSequential", "DownLevel", "UpLevel", "MidBlock",
                       "_CLIPEncoderLayer", "_ResidualAttentionBlock")


def check_choice(name, value, choices):
    """`value` if it is one of `choices`, else an SdfastError listing them."""
    if value not in choices:
        raise SdfastError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def make_accelerator(mixed_precision="no", gradient_accumulation_steps=1, cpu=False):
    """An `accelerate.Accelerator`. In a single process, a state left by an earlier run with
    another precision is reset (accelerate keeps one global state per process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, GradientState

    check_choice("mixed_precision", mixed_precision, MIXED_PRECISIONS)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu = True      # accelerate only sets up multi-process CPU training (gloo) when asked
    state = AcceleratorState._shared_state
    if state and state.get("distributed_type") == DistributedType.NO and (
            state.get("_mixed_precision") != mixed_precision
            or (cpu and state["device"].type != "cpu")):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                                  gradient_accumulation_steps=gradient_accumulation_steps)
    except ValueError as exc:
        raise SdfastError(f"mixed_precision={mixed_precision!r}: {exc}") from None
    if mixed_precision == "fp16" and not accelerator.native_amp:
        # accelerate would silently train in fp32 here (e.g. fp16 on the CPU)
        raise SdfastError(f"mixed_precision='fp16' is not available on {accelerator.device} "
                          "(use bf16 or no)")
    return accelerator


def trainable_(module):
    """Give `module` its own writable parameters (the loader mmaps them read-only) and turn
    gradients on. Returns the module."""
    for param in module.parameters():
        param.data = param.data.clone()
    return module.requires_grad_(True).train()


def freeze_unread(text_encoder):
    """Turn gradients off for the text-encoder weights its forward never reads: the blocks after
    the output layer (SD2 files keep one more than SD runs), `text_projection` and `logit_scale`.
    They would get no gradient, which multi-process (DDP) training refuses. Returns the module."""
    skip = getattr(text_encoder.config, "skip_last_layers", 0)
    unread = list(text_encoder.transformer.resblocks[len(text_encoder.transformer.resblocks)
                                                     - skip:].parameters()) if skip else []
    unread += [getattr(text_encoder, name) for name in ("text_projection", "logit_scale")
               if isinstance(getattr(text_encoder, name, None), torch.nn.Parameter)]
    for param in unread:
        param.requires_grad_(False)
    return text_encoder


def build_optimizer(name, param_groups, weight_decay, is_cuda, log=print):
    """`(optimizer, name actually used)`. `adamw8bit-if-available` is bitsandbytes' AdamW8bit
    when it is installed and the parameters are on CUDA, else torch's AdamW (said in `log`)."""
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"],
                               weight_decay=weight_decay), "sgd"
    if name == "adamw8bit-if-available":
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None and is_cuda:
            return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay), "adamw8bit"
        log("optimizer adamw8bit-if-available: bitsandbytes " +
            ("is not installed" if bnb is None else "needs CUDA") + "; using adamw")
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay), "adamw"


def lr_factor(name, step, warmup, total):
    """The multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if name == "constant":
        return 1.0
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))          # cosine


def build_lr_scheduler(optimizer, name, warmup, total):
    """A LambdaLR following `lr_factor` (its state is the step count: checkpointable)."""
    check_choice("lr_scheduler", name, LR_SCHEDULERS)
    if name == "constant" and warmup:
        raise SdfastError("lr_warmup_steps needs a scheduler with warmup "
                          "(constant_with_warmup, linear or cosine)")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(name, step, warmup, total))


def seeded_generator(*words):
    """A CPU generator seeded from non-negative integers `words` (mixed by numpy's
    SeedSequence, so nearby seeds give unrelated streams)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed((int(state[0]) << 31) ^ int(state[1]))


def step_generator(seed, step, index):
    """The generator of one micro-batch: a pure function of its coordinates, so a resumed run
    draws the same noise and timesteps as an uninterrupted one. `index` is the micro-batch's
    place in the global step (`micro * num_processes + rank`), so n processes with accumulation
    k draw what one process with accumulation n * k draws. (The trailing 0 keeps the streams of
    runs made before the index was global.)"""
    return seeded_generator(0, seed, step, index, 0)


def enable_gradient_checkpointing(module):
    """Recompute each block of `module` (see CHECKPOINTED_BLOCKS) in the backward pass instead
    of keeping its activations. Instance-level: the module's class and keys are unchanged."""
    from torch.utils.checkpoint import checkpoint

    count = 0
    for block in module.modules():
        if type(block).__name__ not in CHECKPOINTED_BLOCKS:
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        count += 1
    return count


__all__ = ["OPTIMIZERS", "LR_SCHEDULERS", "MIXED_PRECISIONS", "SAVE_PRECISIONS", "check_choice",
           "make_accelerator", "trainable_", "freeze_unread", "build_optimizer", "lr_factor",
           "build_lr_scheduler", "seeded_generator", "step_generator",
           "enable_gradient_checkpointing"]
