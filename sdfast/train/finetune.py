"""`train_finetune`: full fine-tuning of a Stable Diffusion 1.x / 2.x checkpoint.

Two stages share the function:
- default: train the UNet (and, with `train_text_encoder`, the text encoder) on the diffusion
  loss (`objectives.DiffusionObjective`); the VAE only encodes the images to latents.
- `train_vae=True`: train only the VAE as an autoencoder (`objectives.VAEObjective`); the UNet and
  text encoder are saved untouched. Training the built-in model from a random start runs this
  stage first, then the diffusion stage on its output.

The run itself (data, accelerate, saves, resume, the loop) is `engine.run_method`'s; this
module says what fine-tuning trains and that it saves LDM single files (`save_ldm`, shared with
DreamBooth).
"""
from __future__ import annotations

import os

import torch

from ..errors import SdfastError
from .common import SAVE_PRECISIONS, check_choice, freeze_unread, trainable_
from .engine import (LATENT_MODES, Method, TrainResult, diffusion_objective, encode_latents,
                     latent_cache, positive, run_method)
from .objectives import VAE_LOSSES, VAEObjective, foreground_crops, latent_shape
from .run import RUN_ID_KEY


def save_ldm(run, parts, o, method):
    """`save(step)`: the whole model as an LDM single file, tagged with the run id."""
    from ..io.diffusers import TEXT_SKIP_KEY
    from ..io.save import save_checkpoint

    dtype = SAVE_PRECISIONS[o["save_precision"]]
    base = os.path.basename(os.path.normpath(o["model"]))

    def save(step):
        meta = {RUN_ID_KEY: run.run_id, "sdfast.train.method": method,
                "sdfast.train.step": step, "sdfast.train.base_model": base}
        if TEXT_SKIP_KEY in parts.metadata:
            meta[TEXT_SKIP_KEY] = parts.metadata[TEXT_SKIP_KEY]

        def write(path, overwrite):
            save_checkpoint(path, parts.unet, parts.vae, parts.text_encoder, parts.info.family,
                            parts.info.prediction, dtype=dtype, metadata=meta,
                            overwrite=overwrite)
        return run.save_model(step, write)
    return save


def unet_objective(parts, o):
    """`(objective, param groups, trained modules)` of full UNet (+ text encoder) training."""
    lr = o["learning_rate"]
    trained = [trainable_(parts.unet)]
    groups = [{"params": list(parts.unet.parameters()), "lr": lr}]
    if o["train_text_encoder"]:
        trained.append(freeze_unread(trainable_(parts.text_encoder)))
        groups.append({"params": [p for p in parts.text_encoder.parameters() if p.requires_grad],
                       "lr": o["text_encoder_lr"] or lr})
    objective = diffusion_objective(parts, o, train_text_encoder=o["train_text_encoder"])
    return objective, groups, trained


def check_text_encoder_lr(o):
    if o["text_encoder_lr"] is not None:
        positive("text_encoder_lr", o["text_encoder_lr"], float)
        if not o["train_text_encoder"]:
            raise SdfastError("text_encoder_lr needs train_text_encoder")


class Finetune(Method):
    """Full fine-tuning of the UNet (+ text encoder), or the VAE stage (module docstring)."""

    name = "finetune"
    settings = ("text_encoder_lr", "train_text_encoder", "train_vae", "vae_loss", "kl_weight",
                "vae_foreground_weight", "vae_edge_weight", "vae_crop")

    def check_options(self, o):
        positive("kl_weight", o["kl_weight"], float, allow_zero=True)
        for key in ("vae_foreground_weight", "vae_edge_weight"):
            positive(key, o[key], float, allow_zero=True)
            if o[key] and not o["train_vae"]:
                raise SdfastError(f"{key} needs train_vae")
        if o["vae_crop"] is not None:
            positive("vae_crop", o["vae_crop"])
            if not o["train_vae"]:
                raise SdfastError("vae_crop needs train_vae")
        check_choice("vae_loss", o["vae_loss"], VAE_LOSSES)
        check_text_encoder_lr(o)
        if o["train_vae"]:
            for key in ("train_text_encoder", "cache_latents", "noise_offset", "min_snr_gamma",
                        "debiased_estimation_loss"):
                if o[key] not in (None, False, 0):
                    raise SdfastError(f"train_vae trains only the VAE: {key} does not apply")

    def check_data(self, data, o):
        self.check_subsets(data)
        if not o["train_vae"]:             # the VAE stage needs no captions
            data.check_captions()

    def setup(self, parts, o, device):
        if o["train_vae"]:
            objective = VAEObjective(trainable_(parts.vae), o["vae_loss"], o["kl_weight"],
                                     o["vae_foreground_weight"], o["vae_edge_weight"])
            groups = [{"params": list(parts.vae.parameters()), "lr": o["learning_rate"]}]
            return objective, groups, [parts.vae]
        return unet_objective(parts, o)

    def micro_loss(self, objective, parts, data, o, acc):
        if not o["train_vae"]:
            return Method.micro_loss(self, objective, parts, data, o, acc)
        shape, device = parts.vae.config, acc.device

        def loss(batch, inputs, generator):
            pixels = inputs["pixels"]
            if o["vae_crop"]:
                pixels = vae_crops(pixels, o["vae_crop"], shape, data.config.path, generator)
            eps = torch.randn(latent_shape(shape, pixels.shape[0], *pixels.shape[2:]),
                              generator=generator)
            return objective(pixels.to(device), eps.to(device))
        return loss

    def saver(self, run, parts, o):
        return save_ldm(run, parts, o, "finetune-vae" if o["train_vae"] else self.name)


def vae_crops(pixels, size, vae_config, config_path, generator):
    """`foreground_crops` of the batch, after checking `size` suits the images and the VAE."""
    factor = 2 ** (len(vae_config.ch_mult) - 1)
    if size % factor or size > min(pixels.shape[2:]):
        raise SdfastError(f"vae_crop={size}: must be a multiple of {factor} (the VAE's "
                          f"downsampling) and at most the images' {tuple(pixels.shape[2:])} "
                          f"({config_path})")
    return foreground_crops(pixels, size, generator)


def train_finetune(model, dataset_config, output_dir, output_name, *, max_train_steps=1600,
                   learning_rate=1e-5, lr_scheduler="constant", lr_warmup_steps=0,
                   optimizer="adamw", weight_decay=0.01, max_grad_norm=1.0, mixed_precision="no",
                   gradient_checkpointing=False, gradient_accumulation_steps=1,
                   save_every_n_steps=None, save_precision="fp32", seed=0, resume=None,
                   noise_offset=0.0, min_snr_gamma=None, min_timestep=0, max_timestep=None,
                   debiased_estimation_loss=False, train_text_encoder=False,
                   text_encoder_lr=None, train_vae=False, vae_loss="l1", kl_weight=1e-6,
                   vae_foreground_weight=0.0, vae_edge_weight=0.0, vae_crop=None,
                   cache_latents=False, cache_latents_to_disk=False, latents="sample",
                   num_workers=0, cpu=False, progress=True) -> TrainResult:
    """Fine-tune `model` on the kohya dataset config `dataset_config`; the model is written to
    `output_dir/output_name.safetensors` (see the module docstring and `sdfast.train.run`).

    A step is one optimizer step over `gradient_accumulation_steps` micro-batches on every
    process. `cache_latents` encodes every image once, before training, and keeps the latents
    in memory. `latents`: the VAE posterior "sample" (default) or its "mean".
    `min_snr_gamma`, `vae_foreground_weight`, `vae_edge_weight`: loss weightings, `vae_crop`:
    train the VAE on windows of that many pixels around the foreground
    (`sdfast.train.objectives`).
    `resume`: a state folder, or an output folder whose latest state is continued.
    """
    return run_method(Finetune(), dict(locals()))


__all__ = ["train_finetune", "TrainResult", "Finetune", "save_ldm", "unet_objective",
           "check_text_encoder_lr", "encode_latents",
           "latent_cache", "LATENT_MODES"]
