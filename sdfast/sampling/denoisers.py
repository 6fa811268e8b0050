"""Denoiser adapters: turn an eps- or v-predicting UNet into D(x, sigma) -> denoised x0.

Samplers work in k-diffusion's VE convention, x = x0 + sigma * noise (Karras et al. 2022), and
only ever see D. The adapters follow k-diffusion's `external.py`:
- eps (`DiscreteEpsDDPMDenoiser`): D = x - sigma * eps(x * c_in, t), c_in = 1 / sqrt(sigma^2 + 1);
- v (`DiscreteVDDPMDenoiser`, Salimans & Ho 2022 with sigma_data = 1):
  D = c_skip * x + c_out * v(x * c_in, t), c_skip = 1 / (sigma^2 + 1),
  c_out = -sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1);
with the UNet's continuous timestep t = model_sampling.timestep(sigma).
"""
from torch import nn


def append_dims(x, target_dims):
    """[B] -> [B, 1, ..., 1] with `target_dims` dimensions in all (k-diffusion `utils`)."""
    if x.ndim > target_dims:
        raise ValueError(f"input has {x.ndim} dims, more than target_dims {target_dims}")
    return x[(...,) + (None,) * (target_dims - x.ndim)]


class _DiscreteDenoiser(nn.Module):
    """Shared call: scale the input, run the UNet at t(sigma), mix its output back into x0."""

    def __init__(self, unet, model_sampling):
        super().__init__()
        self.inner_model = unet
        self.model_sampling = model_sampling

    def scalings(self, sigma):
        """(c_skip, c_out, c_in), each shaped like sigma [B]."""
        raise NotImplementedError

    def forward(self, x, sigma, **kwargs):
        """x: [B, ...] noisy sample at noise level sigma [B]; kwargs go to the UNet, except `seed`
        (samplers pass it for their noise, the UNet has no use for it)."""
        kwargs.pop("seed", None)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.scalings(sigma))  # [B] -> [B, 1, 1, 1]
        out = self.inner_model(x * c_in, self.model_sampling.timestep(sigma), **kwargs)
        return x * c_skip + out.to(x.dtype) * c_out


class EpsDenoiser(_DiscreteDenoiser):
    """D(x, sigma) = x - sigma * eps for a UNet that predicts the noise (SD1.x, SD2 base)."""

    def scalings(self, sigma):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        return sigma.new_ones(()), -sigma, c_in


class VDenoiser(_DiscreteDenoiser):
    """D(x, sigma) from a UNet that predicts v = alpha * eps - sigma_vp * x0 (SD2.x 768-v)."""

    def scalings(self, sigma):
        c_skip = 1 / (sigma ** 2 + 1)
        c_out = -sigma / (sigma ** 2 + 1) ** 0.5
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        return c_skip, c_out, c_in


def make_denoiser(unet, model_sampling):
    """The adapter for `model_sampling.prediction`: EpsDenoiser ("eps") or VDenoiser ("v")."""
    adapters = {"eps": EpsDenoiser, "v": VDenoiser}
    if model_sampling.prediction not in adapters:
        raise ValueError(f"unknown prediction {model_sampling.prediction!r}; valid: {', '.join(adapters)}")
    return adapters[model_sampling.prediction](unet, model_sampling)
