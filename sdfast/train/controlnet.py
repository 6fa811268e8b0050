"""`train_controlnet`: a ControlNet (Zhang et al. 2023) trained for a frozen model.

The ControlNet starts as a copy of the UNet's encoder (`time_embed`, `input_blocks`,
`middle_block`) with its zero convolutions (`zero_convs`, `middle_block_out` and the hint
block's last conv) at zero, so before training it adds exactly nothing to the UNet: training
starts from the base model's behaviour. The rest of the hint block is randomly initialised
(seeded by the run's seed). Only the ControlNet trains; the UNet, text encoder and VAE are frozen.

Data: every subset names a `conditioning_data_dir` whose images have the training images' stems
(kohya's ControlNet dataset); they are fitted to the same bucket and fed in 0..1.

Output: the original ControlNet format (`control_model.*` keys, as `cldm` checkpoints), with
the UNet's head settings in the metadata, loadable by `sdfast.load_controlnet`.
"""
from __future__ import annotations

import torch

from ..errors import SdfastError
from .common import SAVE_PRECISIONS
from .engine import Method, TrainResult, diffusion_objective, run_method
from .run import RUN_ID_KEY

CONTROL_PREFIX = "control_model."
_INIT_TAG = 4            # first word of the hint block's init seed
_ENCODER = ("time_embed.", "input_blocks.", "middle_block.")


def init_controlnet(unet, seed=0, hint_channels=3):
    """A ControlNet for `unet`: its encoder copied, zero convolutions at zero (module
    docstring). The hint block's random init comes from `seed`, not the global generator."""
    from ..models.controlnet import ControlNetModel, controlnet_config_from_unet
    from .common import seeded_generator

    seed_value = int(seeded_generator(_INIT_TAG, seed).initial_seed())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_value)
        net = ControlNetModel(controlnet_config_from_unet(unet.config, hint_channels))
    unet_sd = unet.state_dict()
    copied = {k: unet_sd[k] for k in net.state_dict() if k.startswith(_ENCODER)}
    missing = [k for k in net.state_dict() if k.startswith(_ENCODER) and k not in unet_sd]
    if missing:
        raise SdfastError(f"the UNet has no {missing[0]}: cannot copy its encoder")
    net.load_state_dict(copied, strict=False)
    return net.zero_init_().to(next(unet.parameters()).device).train()


def controlnet_state_dict(net, dtype):
    """`{control_model.<cldm key>: tensor}` on the CPU in `dtype`."""
    return {CONTROL_PREFIX + k: v.detach().to("cpu", dtype).contiguous()
            for k, v in net.state_dict().items()}


class ControlNet(Method):
    """A ControlNet for the frozen model (module docstring)."""

    name = "controlnet"
    uses_hints = True

    def setup(self, parts, o, device):
        self.net = init_controlnet(parts.unet, o["seed"])
        objective = diffusion_objective(parts, o, controlnet=self.net)
        groups = [{"params": list(self.net.parameters()), "lr": o["learning_rate"]}]
        return objective, groups, [self.net, parts.unet]

    def saver(self, run, parts, o):
        from ..io.save import model_metadata, save_atomic

        dtype = SAVE_PRECISIONS[o["save_precision"]]

        def save(step):
            meta = {**model_metadata(parts.unet, parts.info.family, parts.info.prediction),
                    RUN_ID_KEY: run.run_id, "sdfast.train.method": self.name,
                    "sdfast.train.step": str(step)}

            def write(path, overwrite):
                save_atomic(controlnet_state_dict(self.net, dtype), path, metadata=meta,
                            overwrite=overwrite)
            return run.save_model(step, write)
        return save


def train_controlnet(model, dataset_config, output_dir, output_name, *, max_train_steps=5000,
                     learning_rate=1e-5, lr_scheduler="constant", lr_warmup_steps=0,
                     optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0, mixed_precision="no",
                     gradient_checkpointing=False, gradient_accumulation_steps=1,
                     save_every_n_steps=None, save_precision="fp32", seed=0, resume=None,
                     noise_offset=0.0, min_snr_gamma=None, min_timestep=0, max_timestep=None,
                     debiased_estimation_loss=False, cache_latents=False,
                     cache_latents_to_disk=False, latents="sample", num_workers=0, cpu=False,
                     progress=True) -> TrainResult:
    """Train a ControlNet for `model` on the kohya dataset config (every subset with a
    `conditioning_data_dir`); writes `output_dir/output_name.safetensors` in the original
    `control_model.*` format (module docstring). The other options are `train_finetune`'s.
    """
    return run_method(ControlNet(), dict(locals()))


__all__ = ["train_controlnet", "ControlNet", "init_controlnet", "controlnet_state_dict",
           "CONTROL_PREFIX"]
