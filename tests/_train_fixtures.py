"""Small models and fixed-batch losses shared by the training tests."""
import pytest
import torch

import sdfast.train.loop
from sdfast.models.clip import CLIPTextConfig, CLIPTextModel
from sdfast.models.unet import UNetConfig, UNetModel
from sdfast.models.vae import AutoencoderKL, VAEConfig
from sdfast.sampling import ModelSampling
from sdfast.train.objectives import VAE_SCALE, DiffusionObjective


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on two shared cores it avoids oversubscription (7x faster here).
    Test modules import it, which makes it their autouse fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_models(seed=0):
    """A random SD1-shaped UNet, VAE (8x) and CLIP text encoder, small enough for CI."""
    torch.manual_seed(seed)
    unet = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                attention_levels=(0, 1), context_dim=64, head_dim=32))
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    text = CLIPTextModel(CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=128))
    return unet, vae, text


@torch.no_grad()
def fixed_loss(unet, text_encoder, vae, images, text_inputs, rounds=4, **objective_kwargs):
    """The diffusion loss of a batch with fixed noise and evenly spread timesteps (so two
    models are compared on exactly the same draws). `text_inputs`: the objective's text
    arguments (`input_ids`, and `slots` for textual inversion); `objective_kwargs`
    (`token_vectors`, `controlnet`) and `hints` go to `DiffusionObjective`."""
    hints = objective_kwargs.pop("hints", None)
    latents = vae.encode(images).mean * VAE_SCALE
    objective = DiffusionObjective(unet, text_encoder, ModelSampling().alphas_cumprod,
                                   **objective_kwargs)
    gen = torch.Generator().manual_seed(123)
    n = latents.shape[0]
    losses = [objective(latents, noise=torch.randn(latents.shape, generator=gen),
                        timesteps=torch.arange(n) * (1000 // n) + 10 + 30 * r, hints=hints,
                        **text_inputs) for r in range(rounds)]
    return float(torch.stack(losses).mean())


def interrupt_at(monkeypatch, step):
    """Make the training loop die (KeyboardInterrupt) when it reaches 0-based step `step`."""
    real = sdfast.train.loop.step_generator

    def fake(seed, at, index):
        if at == step:
            raise KeyboardInterrupt
        return real(seed, at, index)
    monkeypatch.setattr(sdfast.train.loop, "step_generator", fake)
