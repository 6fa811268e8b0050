"""Noise schedules: the discrete VP schedule of SD1/SD2 and the sigma lists samplers walk.

Sources:
- `ModelSampling`: the DDPM forward process (Ho et al. 2020) with the "scaled linear" betas of
  latent diffusion (Rombach et al. 2022, `make_beta_schedule("linear")` in the LDM repo), seen as
  a VE process sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (Karras et al. 2022, sec. 2).
  `timestep`/`sigma` interpolate log-sigma linearly, as k-diffusion's
  `DiscreteSchedule.sigma_to_t` / `t_to_sigma`.
- Schedulers `normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta`: the names and
  math of ComfyUI's `comfy/samplers.py` (`calculate_sigmas`); `karras` is Karras et al. (2022)
  eq. 5, `beta` is Lee et al. (2024, arXiv:2407.12173) with alpha = beta = 0.6.
"""
import math
import numbers

import torch
from torch import nn

from ._special import betaincinv


class ModelSampling(nn.Module):
    """The discrete-time VP schedule of an SD1/SD2 UNet, as noise levels sigma.

    Args:
        prediction: what the UNet predicts, "eps" (SD1.x, SD2 base) or "v" (SD2.x 768-v).
        linear_start, linear_end, timesteps: the "scaled linear" betas
            `linspace(sqrt(start), sqrt(end), timesteps) ** 2` (computed in float64).
        betas: explicit betas (any 1-D sequence); overrides the three arguments above.

    Buffers (float32, move with `.to(device)`): `alphas_cumprod` [T], `sigmas` [T] (ascending,
    sigma of timestep t at index t), `log_sigmas` [T].
    """

    def __init__(self, prediction="eps", linear_start=0.00085, linear_end=0.012, timesteps=1000,
                 betas=None):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction = prediction
        if betas is None:
            betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps,
                                   dtype=torch.float64) ** 2
        else:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise ValueError("a discrete schedule needs at least 2 timesteps")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        # log of the float32 sigmas, so that timestep(sigmas[i]) is exactly i
        self.register_buffer("log_sigmas", self.sigmas.log())

    @property
    def num_timesteps(self):
        return self.sigmas.shape[0]

    @property
    def sigma_min(self):
        return float(self.sigmas[0])

    @property
    def sigma_max(self):
        return float(self.sigmas[-1])

    def timestep(self, sigma):
        """sigma -> continuous timestep t in [0, T-1], linear in log-sigma between neighbours."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log().reshape(-1)  # [...] -> [N]
        low = torch.searchsorted(log_sigmas, log_sigma, right=True) - 1
        low = low.clamp(0, log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)  # [N] -> [...]

    def sigma(self, timestep):
        """Continuous timestep t -> sigma, interpolating log-sigma (t clamped to [0, T-1])."""
        t = torch.as_tensor(timestep)
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float().clamp(0, log_sigmas.shape[0] - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def append_zero(sigmas):
    """[n] -> [n + 1]: the final noise level 0 every schedule ends on."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Karras et al. (2022) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas.float()).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0 (k-diffusion)."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return append_zero(log_sigmas.exp().float()).to(device)


def normal_scheduler(model_sampling, steps, sgm=False):
    """Timesteps evenly spaced from t(sigma_max) to t(sigma_min) (ComfyUI `normal`).

    With `sgm=True`, `steps + 1` points of which the last is dropped (ComfyUI `sgm_uniform`, the
    "trailing" spacing of SGM/SDXL)."""
    start = float(model_sampling.timestep(model_sampling.sigma_max))
    end = float(model_sampling.timestep(model_sampling.sigma_min))
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        timesteps = torch.linspace(start, end, steps)
    return append_zero(model_sampling.sigma(timesteps).float().cpu())


def simple_scheduler(model_sampling, steps):
    """Every (T / steps)-th training sigma from the top, indices truncated (ComfyUI `simple`)."""
    sigmas = model_sampling.sigmas.cpu()
    stride = len(sigmas) / steps
    picked = [sigmas[-(1 + int(i * stride))] for i in range(steps)]
    return append_zero(torch.stack(picked).float())


def ddim_uniform_scheduler(model_sampling, steps):
    """Training sigmas at t = 1, 1 + c, 1 + 2c, ... < T with c = T // steps, descending
    (ComfyUI `ddim_uniform`, after LDM's `make_ddim_timesteps("uniform")`).

    As in ComfyUI, this yields ceil((T - 1) / c) + 1 values, which is more than `steps + 1` when
    `steps` does not divide T (e.g. 31 + 1 for T = 1000, steps = 30)."""
    sigmas = model_sampling.sigmas.cpu()
    stride = max(len(sigmas) // steps, 1)
    picked = sigmas[1::stride].flip(0)
    return append_zero(picked.float())


def beta_scheduler(model_sampling, steps, alpha=0.6, beta=0.6):
    """Timesteps at Beta(alpha, beta) quantiles of 1 - i/steps, rounded to the nearest training
    timestep, consecutive duplicates dropped (ComfyUI `beta`; Lee et al. 2024).

    Duplicates appear only for large `steps` (the quantiles crowd at both ends), and then the
    schedule has fewer than `steps + 1` values, as in ComfyUI."""
    sigmas = model_sampling.sigmas.cpu()
    total = len(sigmas) - 1
    picked = []
    last_t = None
    for i in range(steps):
        t = round(betaincinv(alpha, beta, 1.0 - i / steps) * total)
        if t != last_t:
            picked.append(sigmas[t])
        last_t = t
    return append_zero(torch.stack(picked).float())


def _karras(model_sampling, steps):
    return get_sigmas_karras(steps, model_sampling.sigma_min, model_sampling.sigma_max)


def _exponential(model_sampling, steps):
    return get_sigmas_exponential(steps, model_sampling.sigma_min, model_sampling.sigma_max)


def _sgm_uniform(model_sampling, steps):
    return normal_scheduler(model_sampling, steps, sgm=True)


SCHEDULERS = {
    "normal": normal_scheduler,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": _sgm_uniform,
    "simple": simple_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
}


def get_sigmas(scheduler, model_sampling, steps):
    """The descending float32 sigmas (on the CPU) for `steps` sampling steps, ending with 0.

    Returns `steps + 1` values, except where ComfyUI's math gives another count: `ddim_uniform`
    when `steps` does not divide T, and `beta` for large `steps` (see those functions). Callers
    should take the step count as `len(sigmas) - 1`.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return SCHEDULERS[scheduler](model_sampling, int(steps))
