"""One training run, whatever the method: `run_method(method, options)`.

Every method (fine-tune, LoRA, textual inversion, DreamBooth, ControlNet) runs the same steps:
check the options, read the dataset config, set up accelerate and the run's files (`TrainRun`:
ownership checks, atomic saves, resume), load the model, let the method build what it trains
(`Method.setup`), then the shared optimisation loop (`loop.train_loop`) with the method's saver.
A method is a `Method` subclass; most only say what they train and how they save it.

Diffusion methods share `Method.micro_loss`: latents (VAE-encoded each step, or cached), the
batch's captions tokenized (`Method.text_inputs`), noise (+ noise offset) and timesteps drawn
from the micro-batch's generator, per-image prior-loss weights when the data holds class images,
ControlNet hints when the method reads them.

Randomness (noise, timesteps, VAE posterior samples, caption shuffles, batch order) is drawn from
generators seeded by `(seed, step, micro-batch)`, so a run is deterministic on the CPU and a
resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SdfastError
from ..sampling import ModelSampling
from .common import (SAVE_PRECISIONS, build_lr_scheduler, build_optimizer, check_choice,
                     enable_gradient_checkpointing, make_accelerator, seeded_generator)
from .config import load_dataset_config
from .dataset import TrainData
from .loop import train_loop
from .objectives import VAE_SCALE
from .run import TrainRun, check_folder, make_folder, reason, state_name

LATENT_MODES = ("sample", "mean")
_CACHE_TAG = 1          # first word of the latent cache's generator seeds
# Options every method has that shape the loss curve (a resume must repeat them).
COMMON_SETTINGS = ("seed", "learning_rate", "lr_scheduler", "lr_warmup_steps", "optimizer",
                   "weight_decay", "max_grad_norm", "mixed_precision",
                   "gradient_accumulation_steps", "noise_offset", "cache_latents", "latents",
                   "min_snr_gamma", "min_timestep", "max_timestep", "debiased_estimation_loss")


@dataclass
class TrainResult:
    """What a run produced: the final model (for several files per save, the main one; all of
    them in `outputs`), and the loss and lr of every step from step 1."""

    output: Path
    steps: int
    losses: list
    lrs: list
    optimizer: str
    state_dir: Path
    outputs: list = None


def finite(value):
    """Whether a number is finite (not nan or +-inf; an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def positive(name, value, kind=int, allow_zero=False):
    """`value` if it is a positive (or, with `allow_zero`, non-negative) int / number; numbers
    must be finite (nan passes every comparison, so it is refused by name)."""
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and kind is float and not finite(value):
        raise SdfastError(f"{name} must be a finite number, got {value!r}")
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise SdfastError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                          f"{'number' if kind is float else 'integer'}, got {value!r}")
    return value


def check_common_options(o):
    """Bad values of the options every method has, before anything is loaded."""
    if not os.path.exists(o["model"]):
        raise SdfastError(f"{o['model']}: no such model file or folder")
    name = o["output_name"]
    if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
        raise SdfastError(f"output_name must be a plain file name, got {name!r}")
    for key in ("max_train_steps", "gradient_accumulation_steps"):
        positive(key, o[key])
    for key in ("lr_warmup_steps", "num_workers"):
        positive(key, o[key], allow_zero=True)
    if o["save_every_n_steps"] is not None:
        positive("save_every_n_steps", o["save_every_n_steps"])
    positive("learning_rate", o["learning_rate"], float)
    for key in ("noise_offset", "max_grad_norm", "weight_decay"):
        positive(key, o[key], float, allow_zero=True)
    check_choice("save_precision", o["save_precision"], tuple(SAVE_PRECISIONS))
    check_choice("latents", o["latents"], LATENT_MODES)
    if o["cache_latents_to_disk"]:               # kohya's meaning: implies caching at all
        if not isinstance(o["cache_latents_to_disk"], (bool, str, os.PathLike)):
            raise SdfastError("cache_latents_to_disk must be True or a folder, got "
                              f"{o['cache_latents_to_disk']!r}")
        o["cache_latents"] = True
    check_folder(o["output_dir"], "output_dir")
    cache_folder = latent_cache_folder(o)
    if cache_folder is not None:
        check_folder(cache_folder, "cache_latents_to_disk")
    if o["min_snr_gamma"] is not None:
        positive("min_snr_gamma", o["min_snr_gamma"], float)
    if not isinstance(o["debiased_estimation_loss"], bool):
        raise SdfastError("debiased_estimation_loss must be True or False, got "
                          f"{o['debiased_estimation_loss']!r}")
    timestep_range(o)


def timestep_range(o):
    """`[low, high)`: the training timesteps the run draws (`min_timestep`, `max_timestep`,
    the latter capped at the schedule's length); bad values raise SdfastError."""
    low, high = positive("min_timestep", o["min_timestep"], allow_zero=True), o["max_timestep"]
    if high is not None:
        positive("max_timestep", high)
        if high <= low:
            raise SdfastError(f"max_timestep ({high}) must be above min_timestep ({low})")
    steps = len(ModelSampling().alphas_cumprod)
    high = steps if high is None else min(high, steps)
    if low >= high:
        raise SdfastError(f"min_timestep {low} leaves no timestep below {high}")
    return low, high


def diffusion_objective(parts, o, **kwargs):
    """The method's `DiffusionObjective` on `parts` (the model's own prediction type and
    schedule, the run's `min_snr_gamma` and `debiased_estimation_loss`); `kwargs` go to
    `DiffusionObjective`."""
    from ..sampling import ModelSampling
    from .objectives import DiffusionObjective

    prediction = parts.info.prediction
    return DiffusionObjective(parts.unet, parts.text_encoder,
                              ModelSampling(prediction=prediction).alphas_cumprod, prediction,
                              min_snr_gamma=o["min_snr_gamma"],
                              debiased_estimation=o["debiased_estimation_loss"], **kwargs)


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


class LatentCache:
    """Latents of every item computed once and kept in memory on `device`, keyed by
    `(item, size)`: each item at its own bucket up front, in chunks; an item used at another
    size (a class image fitted to an instance batch's bucket) when first asked for. Each item's
    posterior sample has its own generator, so the cache does not depend on the order.

    With a `folder` (`cache_latents_to_disk`), each item's latents are also a file there, named
    by a hash of what they depend on (`vae_key`: the model; the image's path, size and mtime; the
    bucket; the posterior mode and seed), read instead of encoded when present: a resumed or
    repeated run skips the VAE. Files are written whole (temporary file, then rename), so
    processes sharing a folder never read half a file."""

    def __init__(self, vae, data, mode, seed, device, chunk=16, folder=None, vae_key=""):
        self.vae, self.data, self.mode, self.seed, self.device = vae, data, mode, seed, device
        self.folder, self.vae_key = (None if folder is None else Path(folder)), vae_key
        if self.folder is not None:
            make_folder(self.folder, "cache_latents_to_disk")
        self.latents = {}
        by_size = {}
        for index, item in enumerate(data.items):
            by_size.setdefault(item.size, []).append(index)
        for size, indices in by_size.items():
            for i in range(0, len(indices), chunk):
                self._encode(indices[i:i + chunk], size)

    def _file(self, index, size):
        image = Path(self.data.items[index].image).resolve()
        stat = image.stat()
        key = json.dumps([self.vae_key, str(image), stat.st_size, stat.st_mtime_ns, list(size),
                          self.mode, self.seed if self.mode == "sample" else None, index])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def _encode(self, indices, size):
        from safetensors.torch import load_file

        if self.folder is None:
            return self._compute(indices, size)
        files = {i: self._file(i, size) for i in indices}
        todo = [i for i in indices if not files[i].exists()]
        for i in indices:
            if i not in todo:
                stored = load_file(os.fspath(files[i]))["latents"]
                self.latents[(i, size)] = stored.to(self.device)
        if todo:
            self._compute(todo, size)
            for i in todo:
                _save_atomic({"latents": self.latents[(i, size)].cpu().contiguous()}, files[i])

    @torch.no_grad()
    def _compute(self, indices, size):
        from .dataset import load_image

        gens = [seeded_generator(_CACHE_TAG, self.seed, index) for index in indices]
        pixels = torch.stack([load_image(self.data.items[i].image, size) for i in indices])
        latents = encode_latents(self.vae, pixels.to(self.device), self.mode, gens)
        self.latents.update(((i, size), z) for i, z in zip(indices, latents))

    def batch(self, indices):
        """`[B, E, h, w]` latents of a batch at its size (`TrainData.batch_size_of`)."""
        size = self.data.batch_size_of(indices)
        missing = [i for i in dict.fromkeys(indices) if (i, size) not in self.latents]
        if missing:
            self._encode(missing, size)
        return torch.stack([self.latents[(i, size)] for i in indices])


def _save_atomic(tensors, path):
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, os.fspath(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def latent_cache_folder(o):
    """Where `cache_latents_to_disk` keeps latents: `OUTPUT_DIR/latent-cache` for True, or the
    folder given (share one between runs on the same data and model); None when off."""
    value = o["cache_latents_to_disk"]
    if value is True:
        return Path(o["output_dir"]) / "latent-cache"
    return Path(value) if value else None


def model_key(path):
    """Identity of a model file or folder for caches: its path, sizes and mtimes."""
    path = Path(path).resolve()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files
                       if f.is_file()])


def latent_cache(vae, data, mode, seed, device, chunk=16):
    """Latents of every item at its own bucket: `{index: [E, h, w]}` (see `LatentCache`)."""
    cache = LatentCache(vae, data, mode, seed, device, chunk)
    return {i: z for (i, _), z in cache.latents.items()}


class Method:
    """What a training method adds to the shared run. Class attributes:

    - `name`: the method's name (`sdfast train NAME`);
    - `settings`: its own options that a resume must repeat;
    - `suffixes`: the files of one save (see `run.checkpoint_name`);
    - `uses_reg` / `uses_hints`: whether `is_reg` subsets / `conditioning_data_dir` apply.

    `run_method` sets `data` (the training data) and `optimizer_name` on the instance before
    the first save, for savers that describe the run.
    """

    name = "method"
    settings = ()
    suffixes = ("",)
    uses_reg = False
    uses_hints = False

    def check_options(self, o):
        """Method-specific option checks (before anything is loaded)."""

    def check_data(self, data, o):
        """Refuse subsets the method does not use, empty class folders and images without a
        caption."""
        self.check_subsets(data)
        if self.uses_reg:
            check_reg_images(data)
        data.check_captions()

    def check_subsets(self, data):
        """Refuse `is_reg` / `conditioning_data_dir` subsets where they do not apply."""
        path = data.config.path
        subsets = [s for dataset in data.config.datasets for s in dataset.subsets]
        if not self.uses_reg and any(s.is_reg for s in subsets):
            raise SdfastError(f"{path}: is_reg subsets are for DreamBooth and LoRA; "
                              f"{self.name} does not use regularisation images")
        for subset in subsets:
            has_hint = subset.conditioning_data_dir is not None
            if has_hint and not self.uses_hints:
                raise SdfastError(f"{path}: conditioning_data_dir is for ControlNet training; "
                                  f"{self.name} does not use it")
            if self.uses_hints and not has_hint:
                raise SdfastError(f"{path}: {subset.image_dir}: controlnet needs a "
                                  "conditioning_data_dir in every subset")

    def check_model(self, parts):
        if parts.info.inpaint:
            raise SdfastError(f"{parts.source}: inpainting models (9-channel UNet) are not "
                              f"supported by {self.name}")

    def prepare_data(self, data, parts, acc, o):
        """The data to train on, once the model is loaded (DreamBooth makes class images)."""
        return data

    def setup(self, parts, o, device):
        """`(objective, optimizer param groups, modules the gradient runs through)`."""
        raise NotImplementedError

    def inputs(self, o):
        """What the data loader reads for each batch (`dataset.INPUTS`)."""
        pixels = () if o["cache_latents"] else ("pixels",)
        return pixels + (("hints",) if self.uses_hints else ())

    def text_inputs(self, tokenizer, captions):
        """The objective's text arguments for a batch's captions."""
        return {"input_ids": tokenizer(captions)}

    def micro_loss(self, objective, parts, data, o, acc):
        """`micro_loss(batch, inputs, generator)` of the diffusion loss (module docstring).
        Latents are encoded in float32 (outside autocast), cached or not."""
        from ..text import get_tokenizer

        tokenizer = get_tokenizer(pad_id=0 if parts.info.family == "sd2" else None)
        folder = latent_cache_folder(o)
        cache = (LatentCache(parts.vae, data, o["latents"], o["seed"], acc.device,
                             folder=folder, vae_key=model_key(o["model"]))
                 if o["cache_latents"] else None)
        (low, high), device, vae = timestep_range(o), acc.device, parts.vae
        prior, has_reg = o.get("prior_loss_weight", 1.0), data.has_reg

        def loss(batch, inputs, generator):
            if cache is not None:
                latents = cache.batch(batch.indices)
            else:
                with torch.no_grad():
                    latents = encode_latents(vae, inputs["pixels"].to(device), o["latents"],
                                             generator)
            text = self.text_inputs(tokenizer, data.captions(batch, o["seed"]))
            noise = torch.randn(latents.shape, generator=generator)
            if o["noise_offset"]:
                noise += o["noise_offset"] * torch.randn(*latents.shape[:2], 1, 1,
                                                         generator=generator)
            timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator)
            extra = {k: v.to(device) for k, v in text.items()}
            if has_reg:
                extra["weights"] = torch.tensor(
                    [prior if data.items[i].subset.is_reg else 1.0 for i in batch.indices],
                    device=device)
            if "hints" in inputs:
                extra["hints"] = inputs["hints"].to(device)
            return objective(latents, noise=noise.to(device), timesteps=timesteps.to(device),
                             **extra)
        return loss

    def saver(self, run, parts, o):
        """`save(step)`: write the model files of the save after `step` (`run.save_model`)."""
        raise NotImplementedError


def check_reg_images(data, hint=""):
    """Refuse an `is_reg` subset whose folder holds no images (`hint` ends the message)."""
    from .config import list_images

    for dataset in data.config.datasets:
        for subset in dataset.subsets:
            if subset.is_reg and not list_images(subset.image_dir):
                raise SdfastError(f"{data.config.path}: the is_reg folder {subset.image_dir} "
                                  f"holds no images{hint}")


# Options added after runs were already saving states, with the value that reproduces the older
# behaviour: recorded only when set otherwise, so a state saved before them still resumes.
LATER_SETTINGS = {"min_timestep": 0, "max_timestep": None, "debiased_estimation_loss": False}


def settings(method, o, num_processes):
    """The options a resume must repeat (they shape the loss curve)."""
    config = Path(o["dataset_config"]).read_bytes()
    keys = COMMON_SETTINGS + tuple(method.settings)
    return {"method": method.name, "model": os.path.abspath(o["model"]),
            "dataset_config_sha256": hashlib.sha256(config).hexdigest(),
            "num_processes": num_processes,
            **{k: o[k] for k in keys
               if not (k in LATER_SETTINGS and o[k] == LATER_SETTINGS[k])}}


def _trained_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def keep_trained_state_only(acc):
    """Training states hold only the weights that train (a LoRA's state is the LoRA, not the
    model it sits on): accelerate's save_state gets the trained parameters of each prepared
    model, and load_state restores exactly those, refusing a state that lacks one."""
    from safetensors.torch import load_file

    def before_save(models, weights, output_dir):
        for i, model in enumerate(models):
            names = _trained_names(model)
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    def before_load(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            try:
                state = load_file(os.fspath(path), device=str(acc.device))
            except Exception as exc:                # garbage, truncated, missing
                raise SdfastError(f"{path}: unreadable training state file ({reason(exc)})"
                                  ) from None
            missing = sorted(_trained_names(model) - set(state))
            if missing:
                raise SdfastError(f"{input_dir}: the state lacks {len(missing)} trained "
                                  f"weight(s) (e.g. {missing[0]}); it belongs to another setup")
            try:
                model.load_state_dict({k: state[k] for k in _trained_names(model)},
                                      strict=False)
            except RuntimeError as exc:             # a weight of another shape
                raise SdfastError(f"{path}: the state does not fit this run's weights "
                                  f"({reason(exc)})") from None
        models.clear()              # loaded: accelerate must not load them again

    acc.register_save_state_pre_hook(before_save)
    acc.register_load_state_pre_hook(before_load)


def run_method(method, o) -> TrainResult:
    """Train with `method` on the options `o` (the keyword arguments of a `train_*` function)."""
    from ..io.load import load_components

    check_common_options(o)
    method.check_options(o)
    data = TrainData(load_dataset_config(o["dataset_config"]))
    method.check_data(data, o)
    acc = make_accelerator(o["mixed_precision"], o["gradient_accumulation_steps"], o["cpu"])
    run = TrainRun(acc, o["output_dir"], o["output_name"], settings(method, o, acc.num_processes),
                   o["max_train_steps"], o["save_every_n_steps"], o["resume"], method.suffixes)
    parts = load_components(o["model"], "cpu", torch.float32)
    method.check_model(parts)
    data = method.data = method.prepare_data(data, parts, acc, o)
    objective, groups, through = method.setup(parts, o, acc.device)
    if o["gradient_checkpointing"]:
        for module in through:
            enable_gradient_checkpointing(module)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.to(acc.device)
    objective.to(acc.device)
    opt, method.optimizer_name = build_optimizer(o["optimizer"], groups, o["weight_decay"],
                                                 acc.device.type == "cuda", log=acc.print)
    scheduler = build_lr_scheduler(opt, o["lr_scheduler"], o["lr_warmup_steps"],
                                   o["max_train_steps"])
    prepared, opt = acc.prepare(objective, opt)
    acc.register_for_checkpointing(scheduler)
    keep_trained_state_only(acc)
    if run.state_dir is not None:
        run.load_state()
    rows = train_loop(run, prepared, opt, scheduler,
                      method.micro_loss(prepared, parts, data, o, acc), data, seed=o["seed"],
                      accumulation=o["gradient_accumulation_steps"],
                      params=[p for g in groups for p in g["params"]],
                      save_model=method.saver(run, parts, o), max_grad_norm=o["max_grad_norm"],
                      inputs=method.inputs(o), num_workers=o["num_workers"],
                      progress=o["progress"])
    last = o["max_train_steps"]
    return TrainResult(output=run.model_path(last), steps=last, losses=[r[1] for r in rows],
                       lrs=[r[2] for r in rows], optimizer=method.optimizer_name,
                       state_dir=run.output_dir / state_name(last),
                       outputs=run.model_paths(last))


__all__ = ["TrainResult", "Method", "run_method", "settings", "check_common_options",
           "check_reg_images",
           "positive", "encode_latents", "LatentCache", "latent_cache", "LATENT_MODES",
           "COMMON_SETTINGS"]
