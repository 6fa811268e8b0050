"""`train_finetune`: full fine-tuning of a Stable Diffusion 1.x / 2.x checkpoint.

Two stages share the function:
- default: train the UNet (and, with `train_text_encoder`, the text encoder) on the diffusion
  loss (`objectives.DiffusionObjective`); the VAE only encodes the images to latents.
- `train_vae=True`: train only the VAE as an autoencoder (`objectives.VAEObjective`); the UNet and
  text encoder are saved untouched. Training the built-in model from a random start runs this
  stage first, then the diffusion stage on its output.

Randomness (noise, timesteps, VAE posterior samples, caption shuffles, batch order) is drawn from
generators seeded by `(seed, step, micro-batch, process)`, so a run is deterministic on the CPU
and a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SdfastError
from ..sampling import ModelSampling
from .common import (SAVE_PRECISIONS, build_lr_scheduler, build_optimizer, check_choice,
                     enable_gradient_checkpointing, make_accelerator, seeded_generator,
                     trainable_)
from .config import load_dataset_config
from .dataset import TrainData
from .loop import train_loop
from .objectives import VAE_LOSSES, VAE_SCALE, DiffusionObjective, VAEObjective, latent_shape
from .run import RUN_ID_KEY, TrainRun, state_name

LATENT_MODES = ("sample", "mean")
_CACHE_TAG = 1          # first word of the latent cache's generator seeds


@dataclass
class TrainResult:
    """What a run produced: the final model, and the loss and lr of every step from step 1."""

    output: Path
    steps: int
    losses: list
    lrs: list
    optimizer: str
    state_dir: Path


def _positive(name, value, kind=int, allow_zero=False):
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise SdfastError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"{'number' if kind is float else 'integer'}, got {value!r}")
    return value


def _check_options(o):
    """Bad values and contradictory combinations, before anything is loaded."""
    if not os.path.exists(o["model"]):
        raise SdfastError(f"{o['model']}: no such model file or folder")
    name = o["output_name"]
    if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
        raise SdfastError(f"output_name must be a plain file name, got {name!r}")
    for key in ("max_train_steps", "gradient_accumulation_steps"):
        _positive(key, o[key])
    for key in ("lr_warmup_steps", "num_workers"):
        _positive(key, o[key], allow_zero=True)
    if o["save_every_n_steps"] is not None:
        _positive("save_every_n_steps", o["save_every_n_steps"])
    _positive("learning_rate", o["learning_rate"], float)
    for key in ("noise_offset", "kl_weight", "max_grad_norm", "weight_decay",
                "vae_foreground_weight"):
        _positive(key, o[key], float, allow_zero=True)
    check_choice("save_precision", o["save_precision"], tuple(SAVE_PRECISIONS))
    check_choice("latents", o["latents"], LATENT_MODES)
    check_choice("vae_loss", o["vae_loss"], VAE_LOSSES)
    if o["text_encoder_lr"] is not None:
        _positive("text_encoder_lr", o["text_encoder_lr"], float)
        if not o["train_text_encoder"]:
            raise SdfastError("text_encoder_lr needs train_text_encoder")
    if o["min_snr_gamma"] is not None:
        _positive("min_snr_gamma", o["min_snr_gamma"], float)
    if o["vae_foreground_weight"] and not o["train_vae"]:
        raise SdfastError("vae_foreground_weight needs train_vae")
    if o["train_vae"]:
        for key in ("train_text_encoder", "cache_latents", "noise_offset", "min_snr_gamma"):
            if o[key] not in (None, False, 0):
                raise SdfastError(f"train_vae trains only the VAE: {key} does not apply")


def _settings(o, num_processes):
    """The options a resume must repeat (they shape the loss curve)."""
    keys = ("seed", "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
            "optimizer", "weight_decay", "max_grad_norm", "mixed_precision",
            "gradient_accumulation_steps", "noise_offset", "train_text_encoder", "train_vae",
            "vae_loss", "kl_weight", "cache_latents", "latents", "min_snr_gamma",
            "vae_foreground_weight")
    config = Path(o["dataset_config"]).read_bytes()
    return {"method": "finetune", "model": os.path.abspath(o["model"]),
            "dataset_config_sha256": hashlib.sha256(config).hexdigest(),
            "num_processes": num_processes, **{k: o[k] for k in keys}}


def _check_model(parts):
    if parts.info.inpaint:
        raise SdfastError(f"{parts.source}: inpainting models (9-channel UNet) are not "
                          "supported by finetune")


def _check_data(data, train_vae):
    for item in data.items:
        if item.subset.is_reg:
            raise SdfastError(f"{data.config.path}: is_reg subsets are for DreamBooth; "
                              "finetune does not use regularisation images")
        if item.subset.conditioning_data_dir is not None:
            raise SdfastError(f"{data.config.path}: conditioning_data_dir is for ControlNet "
                              "training; finetune does not use it")
    if not train_vae:
        data.check_captions()


def encode_latents(vae, pixels, mode, generators):
    """Scaled latents of `pixels`: the posterior mean, or a sample (one generator per image,
    or one generator for the whole batch)."""
    posterior = vae.encode(pixels)
    if mode == "mean":
        return posterior.mean * VAE_SCALE
    if isinstance(generators, torch.Generator):
        return posterior.sample(generators) * VAE_SCALE
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators])
    return (posterior.mean + posterior.std * eps.to(posterior.mean)) * VAE_SCALE


@torch.no_grad()
def latent_cache(vae, data, mode, seed, device, chunk=16):
    """Latents of every item, computed once, kept in memory on `device` (index -> [E, h, w])."""
    by_size = {}
    for index, item in enumerate(data.items):
        by_size.setdefault(item.size, []).append(index)
    cache = {}
    for indices in by_size.values():
        for i in range(0, len(indices), chunk):
            part = indices[i:i + chunk]
            gens = [seeded_generator(_CACHE_TAG, seed, index) for index in part]
            latents = encode_latents(vae, data.pixels(part).to(device), mode, gens)
            cache.update(zip(part, latents))
    return cache


def _micro_loss(prepared, parts, data, o, acc):
    """The stage's `micro_loss(batch, pixels, generator)` for the training loop."""
    from ..text import get_tokenizer

    if o["train_vae"]:
        return _vae_loss(prepared, parts.vae.config, acc.device)
    tokenizer = get_tokenizer(pad_id=0 if parts.info.family == "sd2" else None)
    cache = (latent_cache(parts.vae, data, o["latents"], o["seed"], acc.device)
             if o["cache_latents"] else None)
    return _diffusion_loss(prepared, len(ModelSampling().alphas_cumprod), parts.vae, data,
                           tokenizer, o, cache, acc.device)


def _diffusion_loss(objective, steps, vae, data, tokenizer, o, cache, device):
    """The micro-batch loss of the diffusion stage (`steps`: the schedule's timestep count).
    Latents are encoded in float32 (outside autocast), cached or not."""

    def micro_loss(batch, pixels, generator):
        if cache is not None:
            latents = torch.stack([cache[i] for i in batch.indices])
        else:
            with torch.no_grad():
                latents = encode_latents(vae, pixels.to(device), o["latents"], generator)
        ids = tokenizer(data.captions(batch, o["seed"])).to(device)
        noise = torch.randn(latents.shape, generator=generator)
        if o["noise_offset"]:
            noise += o["noise_offset"] * torch.randn(*latents.shape[:2], 1, 1, generator=generator)
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
        return objective(latents, ids, noise.to(device), timesteps.to(device))
    return micro_loss


def _vae_loss(objective, vae_config, device):
    """The micro-batch loss of the VAE stage (posterior noise from the batch's generator)."""
    def micro_loss(batch, pixels, generator):
        eps = torch.randn(latent_shape(vae_config, pixels.shape[0], *pixels.shape[2:]),
                          generator=generator)
        return objective(pixels.to(device), eps.to(device))
    return micro_loss


def _setup_models(parts, o, device):
    """`(objective on device, optimizer param groups)`; trained modules get writable weights."""
    lr = o["learning_rate"]
    if o["train_vae"]:
        trained = [trainable_(parts.vae)]
        objective = VAEObjective(parts.vae, o["vae_loss"], o["kl_weight"],
                                 o["vae_foreground_weight"])
        groups = [{"params": list(parts.vae.parameters()), "lr": lr}]
    else:
        trained = [trainable_(parts.unet)]
        groups = [{"params": list(parts.unet.parameters()), "lr": lr}]
        if o["train_text_encoder"]:
            trained.append(trainable_(parts.text_encoder))
            groups.append({"params": list(parts.text_encoder.parameters()),
                           "lr": o["text_encoder_lr"] or lr})
        prediction = parts.info.prediction
        objective = DiffusionObjective(parts.unet, parts.text_encoder,
                                       ModelSampling(prediction=prediction).alphas_cumprod,
                                       prediction, o["train_text_encoder"],
                                       o["min_snr_gamma"])
    if o["gradient_checkpointing"]:
        for module in trained:
            enable_gradient_checkpointing(module)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(device)
    return objective.to(device), groups


def _saver(run, parts, o):
    """`save(step)`: the whole model as an LDM single file, tagged with the run id."""
    from ..io.diffusers import TEXT_SKIP_KEY
    from ..io.save import save_checkpoint

    dtype = SAVE_PRECISIONS[o["save_precision"]]
    method = "finetune-vae" if o["train_vae"] else "finetune"
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


def train_finetune(model, dataset_config, output_dir, output_name, *, max_train_steps=1600,
                   learning_rate=1e-5, lr_scheduler="constant", lr_warmup_steps=0,
                   optimizer="adamw", weight_decay=0.01, max_grad_norm=1.0,
                   mixed_precision="no", gradient_checkpointing=False,
                   gradient_accumulation_steps=1, save_every_n_steps=None,
                   save_precision="fp32", seed=0, resume=None, noise_offset=0.0,
                   train_text_encoder=False, text_encoder_lr=None, train_vae=False,
                   vae_loss="l1", kl_weight=1e-6, vae_foreground_weight=0.0,
                   min_snr_gamma=None, cache_latents=False, latents="sample",
                   num_workers=0, cpu=False, progress=True) -> TrainResult:
    """Fine-tune `model` on the kohya dataset config `dataset_config`; the model is written to
    `output_dir/output_name.safetensors` (see the module docstring and `sdfast.train.run`).

    A step is one optimizer step over `gradient_accumulation_steps` micro-batches on every
    process. `cache_latents` encodes every image once, before training, and keeps the latents
    in memory. `latents`: the VAE posterior "sample" (default) or its "mean".
    `min_snr_gamma` and `vae_foreground_weight`: loss weightings (`sdfast.train.objectives`).
    `resume`: a state folder, or an output folder whose latest state is continued.
    """
    o = dict(locals())
    from ..io.load import load_components

    _check_options(o)
    data = TrainData(load_dataset_config(dataset_config))
    _check_data(data, train_vae)
    acc = make_accelerator(mixed_precision, gradient_accumulation_steps, cpu)
    run = TrainRun(acc, output_dir, output_name, _settings(o, acc.num_processes),
                   max_train_steps, save_every_n_steps, resume)
    parts = load_components(model, "cpu", torch.float32)
    _check_model(parts)
    objective, groups = _setup_models(parts, o, acc.device)
    opt, opt_name = build_optimizer(optimizer, groups, weight_decay,
                                    acc.device.type == "cuda", log=acc.print)
    scheduler = build_lr_scheduler(opt, lr_scheduler, lr_warmup_steps, max_train_steps)
    prepared, opt = acc.prepare(objective, opt)
    acc.register_for_checkpointing(scheduler)
    if run.state_dir is not None:
        run.load_state()
    rows = train_loop(run, prepared, opt, scheduler, _micro_loss(prepared, parts, data, o, acc),
                      data, seed=seed, accumulation=gradient_accumulation_steps,
                      params=[p for g in groups for p in g["params"]],
                      save_model=_saver(run, parts, o), max_grad_norm=max_grad_norm,
                      load_pixels=not cache_latents, num_workers=num_workers, progress=progress)
    return TrainResult(output=run.model_path(max_train_steps), steps=max_train_steps,
                       losses=[r[1] for r in rows], lrs=[r[2] for r in rows],
                       optimizer=opt_name, state_dir=run.output_dir / state_name(max_train_steps))


__all__ = ["train_finetune", "TrainResult", "encode_latents", "latent_cache", "LATENT_MODES"]
