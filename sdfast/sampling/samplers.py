"""Samplers in the k-diffusion contract.

`sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`:
- `model(x, sigma_batch, **extra_args)` returns the denoised x0 (see `denoisers.py`);
- `x` is already scaled by sigmas[0] (x = x0 + sigmas[0] * noise), `sigmas` descends to 0;
- `callback` receives `{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}` once per step;
- `disable` is accepted for compatibility; progress display belongs to the caller's callback.
Stochastic samplers take `eta`, `s_noise` and `noise_sampler`; without a noise sampler they build
one from `extra_args["seed"]` (see `noise.py`).

Algorithms follow Katherine Crowson's k-diffusion (`k_diffusion/sampling.py`) and ComfyUI's
additions to it (`comfy/k_diffusion/sampling.py`); each docstring names the paper.
"""
import torch

from .denoisers import append_dims
from .noise import BrownianNoiseSampler, default_noise_sampler


def to_d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras eq. 4)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step: go deterministically to sigma_down, then add
    noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_to^2. eta = 1 is DDPM's
    posterior variance in VE form; eta = 0 is a deterministic step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _setup(x, extra_args):
    """(extra_args dict, ones [B] to broadcast a scalar sigma to the batch)."""
    return ({} if extra_args is None else extra_args), x.new_ones([x.shape[0]])


def _ancestral_noise(x, extra_args, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    return default_noise_sampler(x, extra_args.get("seed"))


def _sde_noise(x, sigmas, extra_args, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    return BrownianNoiseSampler(x, float(positive.min()), float(sigmas.max()), seed=extra_args.get("seed"))


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(x, sigmas, i, churn, noise):
    """Karras et al. (2022) Algorithm 2 lines 4-6: raise the noise level to sigma_hat.

    churn = (s_churn, s_tmin, s_tmax, s_noise); noise() builds the noise sampler on first use."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        eps = noise()(sigmas[i], sigma_hat) * s_noise
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _lazy_noise(x, extra_args):
    """A thunk returning one default noise sampler, built on first call (churn is usually off)."""
    cache = []

    def get():
        if not cache:
            cache.append(default_noise_sampler(x, extra_args.get("seed")))
        return cache[0]

    return get


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022)."""
    extra_args, s_in = _setup(x, extra_args)
    noise = _lazy_noise(x, extra_args)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, (s_churn, s_tmin, s_tmax, s_noise), noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with Euler method steps (k-diffusion; Song et al. 2021 ancestral
    sampling in the VE parameterisation of Karras et al. 2022)."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _ancestral_noise(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022)."""
    extra_args, s_in = _setup(x, extra_args)
    noise = _lazy_noise(x, extra_args)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, (s_churn, s_tmin, s_tmax, s_noise), noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:  # Euler step to sigma = 0
            x = x + d * dt
        else:  # trapezoidal rule with the Euler prediction
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """A sampler inspired by DPM-Solver-2 (Lu et al. 2022) and Algorithm 2 from Karras et al.
    (2022): a midpoint step at the geometric mean of the two noise levels (k-diffusion)."""
    extra_args, s_in = _setup(x, extra_args)
    noise = _lazy_noise(x, extra_args)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, (s_churn, s_tmin, s_tmax, s_noise), noise)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = _dpm_2_step(model, x, d, sigma_hat, sigmas[i + 1], s_in, extra_args)
    return x


def _dpm_2_step(model, x, d, sigma, sigma_next, s_in, extra_args):
    """One DPM-Solver-2 step from sigma to sigma_next (Euler when sigma_next = 0)."""
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
    return x + d_2 * (sigma_next - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                           s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 (Lu et al. 2022) second-order steps (k-diffusion)."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _ancestral_noise(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = _dpm_2_step(model, x, to_d(x, sigmas[i], denoised), sigmas[i], sigma_down, s_in, extra_args)
        if sigma_down != 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order, t, i, j):
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial of node t[i-j] on the nodes
    t[i], ..., t[i-order+1]: the weight of the j-th previous derivative in an `order`-step
    Adams-Bashforth step on the non-uniform grid t. Computed exactly (the integrand is a
    polynomial of degree order - 1), in float64, with the variable shifted by t[i]."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes = [float(t[i - k]) - float(t[i]) for k in range(order)]
    poly = [1.0]  # coefficients of the basis polynomial, lowest degree first
    for k in range(order):
        if k == j:
            continue
        denom = nodes[j] - nodes[k]
        shifted = [0.0] + poly  # tau * poly
        poly = [(shifted[n] - nodes[k] * (poly[n] if n < len(poly) else 0.0)) / denom
                for n in range(len(shifted))]
    h = float(t[i + 1]) - float(t[i])
    return sum(c * h ** (n + 1) / (n + 1) for n, c in enumerate(poly))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth) sampling on the probability-flow ODE in sigma
    (k-diffusion's `sample_lms`; Karras et al. 2022 ODE)."""
    extra_args, s_in = _setup(x, extra_args)
    sigmas_cpu = sigmas.detach().cpu().tolist()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def _t_fn(sigma):
    """DPM-Solver time t = -log(sigma) (the half log-SNR lambda of the VE process)."""
    return sigma.log().neg()


def _sigma_fn(t):
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (Lu et al. 2022,
    arXiv:2211.01095, Algorithm 1 with r = 1/2; k-diffusion)."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _ancestral_noise(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:  # Euler step to sigma = 0
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _sde_half_step(x, denoised, t, t_to, eta, noise_sampler, s_noise):
    """First-order stochastic DPM-Solver++ step from time t to t_to: an ancestral step in
    t = -log(sigma) with its noise taken from the Brownian path over [sigma(t_to), sigma(t)]."""
    sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_to), eta)
    t_down = _t_fn(sd)
    x = (_sigma_fn(t_down) / _sigma_fn(t)) * x - (t - t_down).expm1() * denoised
    return x + noise_sampler(_sigma_fn(t), _sigma_fn(t_to)) * s_noise * su


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                     s_noise=1.0, noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic): the 2-stage DPM-Solver++ of Lu et al. (2022,
    arXiv:2211.01095) with ancestral noise at each stage, by k-diffusion."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _sde_noise(x, sigmas, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:  # Euler step to sigma = 0
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        s = t + (t_next - t) * r
        x_2 = _sde_half_step(x, denoised, t, s, eta, noise_sampler, s_noise)
        denoised_2 = model(x_2, _sigma_fn(s) * s_in, **extra_args)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = _sde_half_step(x, denoised_d, t, t_next, eta, noise_sampler, s_noise)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2; k-diffusion)."""
    extra_args, s_in = _setup(x, extra_args)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                        s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095, sec. 5 SDE variant; k-diffusion),
    with the 'midpoint' or 'heun' second-order correction."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _sde_noise(x, sigmas, extra_args, noise_sampler)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:  # final denoising step
            x = denoised
        else:
            h = _t_fn(sigmas[i + 1]) - _t_fn(sigmas[i])
            eta_h = eta * h
            phi = (-h - eta_h).expm1().neg()  # 1 - exp(-(1 + eta) h)
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                diff = (denoised - old_denoised) * (h / h_last)
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * diff
                else:
                    x = x + 0.5 * phi * diff
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                        s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(3M) SDE: third-order multistep DPM-Solver++ (Lu et al. 2022,
    arXiv:2211.01095) with SDE noise (k-diffusion)."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _sde_noise(x, sigmas, extra_args, noise_sampler)
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:  # final denoising step
            x = denoised
        else:
            h = _t_fn(sigmas[i + 1]) - _t_fn(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            x = x + _three_m_correction(denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta)
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _three_m_correction(denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta):
    """Higher-order terms of DPM-Solver++(3M) from the last two denoised outputs (0 at step 0)."""
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    if h_2 is not None:
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        return phi_2 * d1 - phi_3 * d2
    if h_1 is not None:
        return phi_2 * (denoised - denoised_1) / (h_1 / h)
    return 0.0


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic DDIM (Song et al. 2021, eta = 0). In the VE variables x = x_vp / sqrt(alpha_bar)
    the DDIM update x_vp' = sqrt(a') x0 + sqrt(1 - a') eps becomes x' = x0 + sigma' eps
    = x + (sigma' - sigma) (x - x0) / sigma: exactly an Euler step of the probability-flow ODE
    (as ComfyUI's `ddim`, which runs `sample_euler`)."""
    return sample_euler(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable)


def _ddpm_step(x, sigma, sigma_next, eps, noise_sampler):
    """Ho et al. (2020) eq. 11 / Algorithm 2 step between arbitrary noise levels, in VP variables:
    mu = (x_vp - (1 - alpha) eps / sqrt(1 - a)) / sqrt(alpha), alpha = a / a', plus noise of
    variance (1 - alpha)(1 - a') / (1 - a) (the posterior variance beta-tilde); a = alpha_bar."""
    a = 1 / (sigma ** 2 + 1)
    a_next = 1 / (sigma_next ** 2 + 1)
    alpha = a / a_next
    x_vp = x * a ** 0.5
    mu = (x_vp - (1 - alpha) * eps / (1 - a) ** 0.5) / alpha ** 0.5
    if sigma_next > 0:
        mu = mu + ((1 - alpha) * (1 - a_next) / (1 - a)) ** 0.5 * noise_sampler(sigma, sigma_next)
    return mu / a_next ** 0.5  # back to VE (a_next = 1 at sigma_next = 0)


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on the given noise levels, as
    ComfyUI's `sample_ddpm`."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _ancestral_noise(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        eps = to_d(x, sigmas[i], denoised)
        x = _ddpm_step(x, sigmas[i], sigmas[i + 1], eps, noise_sampler)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378,
    Algorithm 3): take the consistency function's x0, then re-noise it to the next level,
    x = denoised + sigma_next * noise (eps-space VE). The LCM boundary-condition scalings belong
    to the denoiser, as in ComfyUI's `sample_lcm`."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _ancestral_noise(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x
