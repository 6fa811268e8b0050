"""k-diffusion-style samplers, noise schedules and denoiser adapters.

A UNet becomes a denoiser `D = make_denoiser(unet, ModelSampling(...))`; `get_sigmas(scheduler,
model_sampling, steps)` gives the noise levels; `get_sampler(name)(D, noise * sigmas[0], sigmas,
extra_args={"seed": seed, ...})` runs the sampling loop.
"""
from .denoisers import EpsDenoiser, VDenoiser, append_dims, make_denoiser
from .noise import BrownianNoiseSampler, default_noise_sampler
from .registry import SAMPLERS, get_sampler
from .samplers import (
    get_ancestral_step,
    linear_multistep_coeff,
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    to_d,
)
from .schedules import (
    SCHEDULERS,
    ModelSampling,
    append_zero,
    get_sigmas,
    get_sigmas_exponential,
    get_sigmas_karras,
)
from .uni_pc import sample_uni_pc, sample_uni_pc_bh2

__all__ = [
    "BrownianNoiseSampler", "EpsDenoiser", "ModelSampling", "SAMPLERS", "SCHEDULERS", "VDenoiser",
    "append_dims", "append_zero", "default_noise_sampler", "get_ancestral_step", "get_sampler",
    "get_sigmas", "get_sigmas_exponential", "get_sigmas_karras", "linear_multistep_coeff",
    "make_denoiser", "sample_ddim", "sample_ddpm", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lcm",
    "sample_lms", "sample_uni_pc", "sample_uni_pc_bh2", "to_d",
]
