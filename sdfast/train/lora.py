"""`train_lora`: LoRA / LoCon training as kohya's sd-scripts (`networks/lora.py`), saved as
kohya LoRA files that sdfast (`Pipeline.load_lora`), A1111, ComfyUI and diffusers
(`load_lora_weights`) load.

Targets (kohya's): in the UNet, every linear and 1x1 conv inside the transformer blocks
(diffusers' `Transformer2DModel`: proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0,
ff.net.0.proj, ff.net.2) at rank `network_dim`; with `conv_dim` (LoCon) also the res blocks and
resamplers (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`): 3x3 convs at rank `conv_dim`, their
linears and 1x1 convs at `network_dim`. In the text encoder, the attention (q, k, v, out) and
MLP (fc1, fc2) linears of every layer the encoder runs; SD2's fused q/k/v weight takes one LoRA
per third of its rows.

A LoRA module changes a weight `W [O, I, (kh, kw)]` to `W + (alpha / rank) * up @ down`, with
`down [rank, I, (kh, kw)]` (kaiming-uniform, a = sqrt(5)) and `up [O, rank, (1, 1)]` (zeros), so
training starts from the base model. Here the change is a `torch.nn.utils.parametrize`
parametrization of the weight (the frozen original is never written): one code path for linears,
convs and row ranges. kohya runs `down` and `up` as layers instead; the two are the same function.

File: `lora_unet_<diffusers path>` / `lora_te_<transformers path>` (`.` as `_`) with
`.lora_down.weight`, `.lora_up.weight`, `.alpha`, and kohya's `ss_*` metadata.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..addons.targets import kohya_name, text_hf_names, unet_diffusers_names
from ..errors import SdfastError
from .common import SAVE_PRECISIONS, seeded_generator
from .engine import Method, TrainResult, diffusion_objective, positive, run_method
from .run import RUN_ID_KEY

NETWORK_MODULE = "networks.lora"       # kohya's ss_network_module for LoRA / LoCon
_INIT_TAG = 2                          # first word of the LoRA init generator's seed


class LoraWeight(nn.Module):
    """The parametrization `W -> W + scale * up @ down` of one weight (rows `rows` only, when
    given). `shape` is the weight's; `up` and `down` are named as in kohya's files."""

    def __init__(self, shape, rank, alpha, rows=None, generator=None):
        super().__init__()
        out = shape[0] if rows is None else rows[1] - rows[0]
        self.inner = tuple(shape[1:])                   # (I,) or (I, kh, kw)
        self.rows = rows
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.lora_down = nn.Parameter(torch.empty(rank, *self.inner))
        self.lora_up = nn.Parameter(torch.zeros(out, rank, *[1] * (len(self.inner) - 1)))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5), generator=generator)

    def delta(self):
        """`scale * up @ down` shaped as the changed rows of the weight."""
        up, down = self.lora_up.flatten(1), self.lora_down.flatten(1)   # [O, r], [r, I*k*k]
        return (up @ down).view(up.shape[0], *self.inner) * self.scale

    def forward(self, weight):
        delta = self.delta().to(weight.dtype)
        if self.rows is None:
            return weight + delta
        start, stop = self.rows
        return torch.cat([weight[:start], weight[start:stop] + delta, weight[stop:]])


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA module to train: its kohya name, the weight it changes, its rank and alpha."""

    name: str
    component: str           # "unet" or "text_encoder"
    param: str               # the weight's name in the component (before parametrization)
    rows: tuple | None
    rank: int
    alpha: float


def plan_network(unet, text_encoder, o):
    """The `LoraSpec`s of kohya's targets (module docstring) for these options, sorted."""
    specs = []
    if not o["network_train_text_encoder_only"]:
        weights = dict(unet.named_parameters())
        for param, module in unet_diffusers_names(unet).items():
            is_3x3 = weights[param].dim() == 4 and weights[param].shape[2:] != (1, 1)
            if ".attentions." in module and not is_3x3:
                rank, alpha = o["network_dim"], o["network_alpha"]
            elif o["conv_dim"] and (".resnets." in module or "samplers." in module):
                rank, alpha = ((o["conv_dim"], o["conv_alpha"]) if is_3x3
                               else (o["network_dim"], o["network_alpha"]))
            else:
                continue
            specs.append(LoraSpec(kohya_name("unet", module), "unet", param, None, rank, alpha))
    if not o["network_train_unet_only"]:
        for module, target in text_hf_names(text_encoder):
            specs.append(LoraSpec(kohya_name("text_encoder", module), "text_encoder",
                                  target.param, target.rows, o["network_dim"], o["network_alpha"]))
    return sorted(specs, key=lambda s: s.name)


def check_ranks(specs, components, o):
    """Refuse a `network_dim` / `conv_dim` above the rank of every weight it applies to: the
    change `up @ down` of a weight `[O, I, (kh, kw)]` has rank at most `min(O, I*kh*kw)`, so a
    larger rank only costs memory (kohya does not check; 100000 fills any machine's)."""
    widest = {}
    for spec in specs:
        shape = components[spec.component].get_parameter(spec.param).shape
        out = shape[0] if spec.rows is None else spec.rows[1] - spec.rows[0]
        key = "conv_dim" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "network_dim"
        widest[key] = max(widest.get(key, 0), min(out, math.prod(shape[1:])))
    for key, full in sorted(widest.items()):
        if o[key] > full:
            raise SdfastError(f"{key} {o[key]} is above the rank of every layer it trains (a "
                              f"LoRA's rank is at most min(in, out) of its weight: {full} for "
                              f"the widest layer of this model)")


def apply_network(specs, components, generator):
    """Create each spec's `LoraWeight` and parametrize its weight with it; returns
    `{name: LoraWeight}` in spec order."""
    loras = {}
    for spec in specs:
        component = components[spec.component]
        path, _, attr = spec.param.rpartition(".")
        module = component.get_submodule(path)
        weight = getattr(module, attr)
        lora = LoraWeight(weight.shape, spec.rank, spec.alpha, spec.rows, generator)
        parametrize.register_parametrization(module, attr, lora)
        loras[spec.name] = lora
    return loras


def kohya_state_dict(loras, dtype):
    """`{name.lora_down.weight, name.lora_up.weight, name.alpha}` in `dtype` on the CPU."""
    out = {}
    for name, lora in loras.items():
        out[f"{name}.lora_down.weight"] = lora.lora_down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = lora.lora_up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
    return out


def base_model_version(info):
    """kohya's `ss_base_model_version`: sd_v1 / sd_v2, with `_v` for v-prediction."""
    version = "sd_v2" if info.family == "sd2" else "sd_v1"
    return version + ("_v" if info.prediction == "v" else "")


def dataset_summary(data):
    """kohya's per-folder facts: `(tag_frequency, dataset_dirs, reg_dataset_dirs)`, each keyed
    by the image folder's name; tags are the comma-separated caption pieces, lower-cased."""
    tags, dirs, reg_dirs = {}, {}, {}
    for item in data.items:
        folder = os.path.basename(os.fspath(item.subset.image_dir))
        entry = (reg_dirs if item.subset.is_reg else dirs).setdefault(
            folder, {"n_repeats": item.subset.num_repeats, "img_count": 0})
        entry["img_count"] += 1
        counts = tags.setdefault(folder, {})
        for tag in (item.caption or "").split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return tags, dirs, reg_dirs


def kohya_metadata(o, parts, data, run, step, optimizer_name, num_processes):
    """The `ss_*` metadata kohya's train_network.py writes (string values)."""
    tags, dirs, reg_dirs = dataset_summary(data)
    first = data.config.datasets[0]
    images = sum(d["img_count"] * d["n_repeats"] for d in dirs.values())
    reg_images = sum(d["img_count"] * d["n_repeats"] for d in reg_dirs.values())
    meta = {
        "ss_session_id": int(run.run_id[:8], 16), "ss_training_started_at": run.started_at,
        "ss_training_finished_at": time.time(), "ss_output_name": o["output_name"],
        "ss_sd_model_name": os.path.basename(os.path.normpath(o["model"])),
        "ss_base_model_version": base_model_version(parts.info),
        "ss_v2": parts.info.family == "sd2", "ss_v_parameterization": parts.info.prediction == "v",
        "ss_network_module": NETWORK_MODULE, "ss_network_dim": o["network_dim"],
        "ss_network_alpha": o["network_alpha"], "ss_steps": step,
        "ss_max_train_steps": o["max_train_steps"], "ss_learning_rate": o["learning_rate"],
        "ss_unet_lr": o["unet_lr"], "ss_text_encoder_lr": o["text_encoder_lr"],
        "ss_lr_scheduler": o["lr_scheduler"], "ss_lr_warmup_steps": o["lr_warmup_steps"],
        "ss_optimizer": optimizer_name, "ss_mixed_precision": o["mixed_precision"],
        "ss_gradient_checkpointing": o["gradient_checkpointing"],
        "ss_gradient_accumulation_steps": o["gradient_accumulation_steps"],
        "ss_max_grad_norm": o["max_grad_norm"], "ss_seed": o["seed"],
        "ss_noise_offset": o["noise_offset"], "ss_cache_latents": o["cache_latents"],
        "ss_prior_loss_weight": o["prior_loss_weight"],
        "ss_resolution": str(tuple(first.resolution)), "ss_enable_bucket": first.enable_bucket,
        "ss_min_bucket_reso": first.min_bucket_reso, "ss_max_bucket_reso": first.max_bucket_reso,
        "ss_batch_size_per_device": first.batch_size,
        "ss_total_batch_size": first.batch_size * num_processes
        * o["gradient_accumulation_steps"],
        "ss_num_train_images": images, "ss_num_reg_images": reg_images,
        "ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_training_comment": o["training_comment"],
    }
    if o["conv_dim"]:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(o["conv_dim"]),
                                              "conv_alpha": str(o["conv_alpha"])})
    return {k: str(v) for k, v in meta.items()}


def model_hash(tensors):
    """kohya's `sshs_model_hash`: SHA-256 of the safetensors data section (header excluded, so
    the metadata does not change it)."""
    import hashlib

    from safetensors.torch import save

    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header:]).hexdigest()


class Lora(Method):
    """LoRA / LoCon on the UNet and text encoder (module docstring)."""

    name = "lora"
    uses_reg = True
    settings = ("network_dim", "network_alpha", "conv_dim", "conv_alpha", "unet_lr",
                "text_encoder_lr", "network_train_unet_only", "network_train_text_encoder_only",
                "prior_loss_weight")

    def check_options(self, o):
        positive("network_dim", o["network_dim"])
        positive("network_alpha", o["network_alpha"], float)
        positive("prior_loss_weight", o["prior_loss_weight"], float, allow_zero=True)
        if o["conv_dim"] is not None:
            positive("conv_dim", o["conv_dim"])
            positive("conv_alpha", o["conv_alpha"], float)
        for key in ("unet_lr", "text_encoder_lr"):
            if o[key] is not None:
                positive(key, o[key], float)
        if o["network_train_unet_only"] and o["network_train_text_encoder_only"]:
            raise SdfastError("network_train_unet_only and network_train_text_encoder_only "
                              "exclude each other")
        if o["network_train_unet_only"] and o["text_encoder_lr"] is not None:
            raise SdfastError("text_encoder_lr needs the text encoder trained (not with "
                              "network_train_unet_only)")
        if o["network_train_text_encoder_only"] and o["unet_lr"] is not None:
            raise SdfastError("unet_lr needs the UNet trained (not with "
                              "network_train_text_encoder_only)")
        self.options = o

    def check_data(self, data, o):
        super().check_data(data, o)
        self.data = data

    def setup(self, parts, o, device):
        specs = plan_network(parts.unet, parts.text_encoder, o)
        components = {"unet": parts.unet, "text_encoder": parts.text_encoder}
        check_ranks(specs, components, o)
        self.loras = apply_network(specs, components, seeded_generator(_INIT_TAG, o["seed"]))
        groups = []
        for component, lr in (("unet", o["unet_lr"]), ("text_encoder", o["text_encoder_lr"])):
            params = [p for s in specs if s.component == component
                      for p in self.loras[s.name].parameters()]
            if params:
                groups.append({"params": params, "lr": lr or o["learning_rate"]})
        train_text = not o["network_train_unet_only"]
        objective = diffusion_objective(parts, o, train_text_encoder=train_text)
        through = [parts.unet] + ([parts.text_encoder] if train_text else [])
        return objective, groups, through

    def saver(self, run, parts, o):
        from ..io.save import save_atomic

        dtype = SAVE_PRECISIONS[o["save_precision"]]
        processes = run.accelerator.num_processes

        def save(step):
            def write(path, overwrite):
                tensors = kohya_state_dict(self.loras, dtype)
                meta = kohya_metadata(o, parts, self.data, run, step, self.optimizer_name,
                                      processes)
                meta.update({"sshs_model_hash": model_hash(tensors), RUN_ID_KEY: run.run_id,
                             "sdfast.train.method": self.name, "sdfast.train.step": str(step)})
                save_atomic(tensors, path, metadata=meta, overwrite=overwrite)
            return run.save_model(step, write)
        return save


def train_lora(model, dataset_config, output_dir, output_name, *, max_train_steps=1600,
               learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=0, optimizer="adamw",
               weight_decay=0.01, max_grad_norm=1.0, mixed_precision="no",
               gradient_checkpointing=False, gradient_accumulation_steps=1,
               save_every_n_steps=None, save_precision="fp32", seed=0, resume=None,
               noise_offset=0.0, min_snr_gamma=None, min_timestep=0, max_timestep=None,
               debiased_estimation_loss=False, network_dim=4, network_alpha=1.0,
               conv_dim=None, conv_alpha=1.0, unet_lr=None, text_encoder_lr=None,
               network_train_unet_only=False, network_train_text_encoder_only=False,
               prior_loss_weight=1.0, training_comment=None, cache_latents=False,
               cache_latents_to_disk=False, latents="sample", num_workers=0, cpu=False,
               progress=True) -> TrainResult:
    """Train a LoRA (LoCon with `conv_dim`) for `model` on the kohya dataset config; the file is
    `output_dir/output_name.safetensors` in kohya's format (module docstring).

    `network_dim` / `network_alpha`: rank and alpha (scale alpha / rank) of the transformer and
    text-encoder modules; `conv_dim` / `conv_alpha` those of the res-block 3x3 convs. `unet_lr`
    and `text_encoder_lr` default to `learning_rate`. `is_reg` subsets (class images) are paired
    with the instance images in every batch and weighted `prior_loss_weight`. The other options
    are `train_finetune`'s.
    """
    return run_method(Lora(), dict(locals()))


__all__ = ["train_lora", "Lora", "LoraWeight", "LoraSpec", "plan_network", "check_ranks",
           "apply_network", "kohya_state_dict", "kohya_metadata", "base_model_version", "NETWORK_MODULE"]
