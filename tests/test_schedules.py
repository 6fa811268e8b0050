"""Schedules and ModelSampling against independent references.

References: the DDPM/LDM beta formula in float64 numpy; diffusers' DDPMScheduler; k-diffusion's
`DiscreteSchedule` (sigma <-> t, and its `get_sigmas(n)`, which is ComfyUI's `normal`) and its
`get_sigmas_karras` / `get_sigmas_exponential`; ComfyUI's scheduler formulas re-derived below in
plain Python; scipy.stats.beta.ppf for the `beta` schedule.
"""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from _kdiffusion import kdiff  # noqa: F401  (session fixture)
from sdfast.sampling import (
    SCHEDULERS,
    ModelSampling,
    get_sigmas,
    get_sigmas_exponential,
    get_sigmas_karras,
)
from sdfast.sampling._special import betainc, betaincinv

# diffusers' schedulers trip NumPy 2 deprecations of torch's __array__ protocol (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
STEPS = [1, 2, 3, 7, 10, 20, 30]
# float32 sigma values computed along different (but exact-in-float64) routes differ by rounding
# only: a relative 1e-6 is ~8 float32 ulps.
RTOL32 = 1e-6
# k-diffusion's karras chain runs in float32: the base max^(1/rho) + ramp * (...) carries ~3
# roundings (u = 2^-24 ~ 6e-8 each) and the power rho = 7 multiplies relative error by 7, so
# ~21u ~ 1.3e-6 (measured 1.1e-6); 4e-6 bounds it. Our float64 path is checked at RTOL32 below.
RTOL_KARRAS_KD = 4e-6


@pytest.fixture(scope="module")
def ms():
    return ModelSampling()


def _reference_sigmas64(start=0.00085, end=0.012, T=1000):
    betas = np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return alphas_cumprod, np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def test_model_sampling_matches_ldm_formula(ms):
    alphas_cumprod, sigmas = _reference_sigmas64()
    assert ms.sigmas.dtype == torch.float32 and ms.sigmas.shape == (1000,)
    np.testing.assert_allclose(ms.alphas_cumprod.numpy(), alphas_cumprod, rtol=RTOL32)
    np.testing.assert_allclose(ms.sigmas.numpy(), sigmas, rtol=RTOL32)
    assert torch.all(ms.sigmas[1:] > ms.sigmas[:-1])
    assert ms.sigma_min == float(ms.sigmas[0]) and ms.sigma_max == float(ms.sigmas[-1])
    assert abs(ms.sigma_max - 14.6146) < 1e-4 and abs(ms.sigma_min - 0.0291675) < 1e-6


def test_model_sampling_matches_diffusers(ms):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers builds the betas and their cumulative product in float32: measured max relative
    # deviation from float64 is ~3e-6 (1000 chained float32 products), so 2e-5 bounds it.
    np.testing.assert_allclose(ms.alphas_cumprod.numpy(), ref.alphas_cumprod.numpy(), rtol=2e-5)


def test_explicit_betas_and_prediction(ms):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    other = ModelSampling(prediction="v", betas=betas)
    assert other.prediction == "v"
    torch.testing.assert_close(other.sigmas, ms.sigmas, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prediction"):
        ModelSampling(prediction="x0")


def test_timestep_and_sigma_match_kdiffusion(ms, kdiff):
    ref = kdiff.external.DiscreteSchedule(ms.sigmas.clone(), quantize=False)
    torch.manual_seed(0)
    # inside the table, at table points, and beyond both ends (clamped to 0 and 999)
    sigma = torch.cat([torch.exp(torch.empty(200).uniform_(math.log(0.01), math.log(30.0))),
                       ms.sigmas[::97], torch.tensor([ms.sigma_min, ms.sigma_max])])
    t = ms.timestep(sigma)
    # both interpolate float32 log-sigmas; differences are float32 rounding of w (<1e-4 of a step)
    torch.testing.assert_close(t, ref.sigma_to_t(sigma), rtol=0, atol=1e-4)
    assert float(ms.timestep(torch.tensor(ms.sigma_max))) == 999.0
    assert float(ms.timestep(torch.tensor(ms.sigma_min))) == 0.0
    tt = torch.cat([torch.empty(200).uniform_(0, 999), torch.arange(0, 1000, 37).float()])
    torch.testing.assert_close(ms.sigma(tt), ref.t_to_sigma(tt), rtol=RTOL32, atol=0)
    # round trip t -> sigma -> t
    torch.testing.assert_close(ms.timestep(ms.sigma(tt)), tt, rtol=0, atol=2e-3)


# ComfyUI `comfy/samplers.py` formulas, written out independently of sdfast.

def _comfy_simple(sigmas, steps):
    ss = len(sigmas) / steps
    return [float(sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def _comfy_ddim_uniform(sigmas, steps):
    sigs = [0.0]
    ss = max(len(sigmas) // steps, 1)
    x = 1
    while x < len(sigmas):
        sigs.append(float(sigmas[x]))
        x += ss
    return sigs[::-1]


def _comfy_beta(sigmas, steps, alpha=0.6, beta=0.6):
    total = len(sigmas) - 1
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), alpha, beta) * total)
    sigs, last_t = [], -1
    for t in ts:
        if t != last_t:
            sigs.append(float(sigmas[int(t)]))
        last_t = t
    return sigs + [0.0]


def _comfy_sgm_uniform(kd_schedule, steps):
    t = torch.linspace(999, 0, steps + 1)[:-1]
    return kd_schedule.t_to_sigma(t).tolist() + [0.0]


def _expected(name, ms, kd_schedule, kdiff, steps):
    if name == "normal":  # ComfyUI normal == linspace(t_max, 0, n) through t_to_sigma
        return kd_schedule.get_sigmas(steps).tolist()
    if name == "karras":
        return kdiff.sampling.get_sigmas_karras(steps, ms.sigma_min, ms.sigma_max).tolist()
    if name == "exponential":
        return kdiff.sampling.get_sigmas_exponential(steps, ms.sigma_min, ms.sigma_max).tolist()
    if name == "sgm_uniform":
        return _comfy_sgm_uniform(kd_schedule, steps)
    if name == "simple":
        return _comfy_simple(ms.sigmas, steps)
    if name == "ddim_uniform":
        return _comfy_ddim_uniform(ms.sigmas, steps)
    if name == "beta":
        return _comfy_beta(ms.sigmas, steps)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedules_match_comfyui(name, ms, kdiff):
    kd_schedule = kdiff.external.DiscreteSchedule(ms.sigmas.clone(), quantize=False)
    for steps in STEPS:
        got = get_sigmas(name, ms, steps)
        expected = torch.tensor(_expected(name, ms, kd_schedule, kdiff, steps), dtype=torch.float32)
        assert got.dtype == torch.float32 and got.ndim == 1
        assert got.shape == expected.shape, (name, steps)
        rtol = RTOL_KARRAS_KD if name == "karras" else RTOL32
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
        assert got[-1] == 0 and torch.all(got[:-1] > got[1:])
        if name not in ("ddim_uniform", "beta"):
            assert len(got) == steps + 1


def test_schedule_lengths_that_follow_comfyui(ms):
    # ComfyUI's ddim_uniform keeps every (1000 // steps)-th sigma from t=1: 31 values for 30 steps
    assert len(get_sigmas("ddim_uniform", ms, 30)) == 32
    assert len(get_sigmas("ddim_uniform", ms, 20)) == 21
    # beta drops duplicate rounded timesteps, which first happens at 139 steps
    assert len(get_sigmas("beta", ms, 138)) == 139
    big = get_sigmas("beta", ms, 200)
    expected = torch.tensor(_comfy_beta(ms.sigmas, 200), dtype=torch.float32)
    assert len(big) == len(expected) < 201
    torch.testing.assert_close(big, expected, rtol=0, atol=0)


def test_karras_exponential_helpers_match_kdiffusion(kdiff):
    for n, lo, hi, rho in [(1, 0.03, 14.6, 7.0), (10, 0.03, 14.6, 7.0), (25, 0.1, 80.0, 3.0)]:
        got = get_sigmas_karras(n, lo, hi, rho=rho)
        torch.testing.assert_close(got, kdiff.sampling.get_sigmas_karras(n, lo, hi, rho=rho),
                                   rtol=RTOL_KARRAS_KD, atol=0)
        ramp = np.linspace(0, 1, n)  # Karras et al. (2022) eq. 5 in float64
        eq5 = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        np.testing.assert_allclose(got[:-1].numpy(), eq5, rtol=RTOL32)
        torch.testing.assert_close(get_sigmas_exponential(n, lo, hi),
                                   kdiff.sampling.get_sigmas_exponential(n, lo, hi), rtol=RTOL32, atol=0)


@pytest.mark.parametrize("bad", ["karas", "", "Normal"])
def test_unknown_scheduler_lists_valid_names(ms, bad):
    with pytest.raises(ValueError) as info:
        get_sigmas(bad, ms, 10)
    for name in SCHEDULERS:
        assert name in str(info.value)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_count(ms, steps):
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("normal", ms, steps)


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (2.0, 3.0), (0.3, 5.0), (5.0, 0.3), (1.0, 1.0)])
def test_incomplete_beta_against_scipy(a, b):
    ps = np.concatenate([np.linspace(0, 1, 401), [1e-10, 1e-6, 1 - 1e-6]])
    # float64 continued fraction vs scipy (cephes): agreement to ~1e-14; 1e-12 leaves margin.
    # The quantile is ill-conditioned where the density is tiny (p -> 1 for a = 0.3, b = 5):
    # 1e-9 there is still ~1e5 times finer than the 1/1000 timestep grid the schedule rounds to.
    for p in ps:
        assert abs(betainc(a, b, p) - special.betainc(a, b, p)) < 1e-12
        assert abs(betaincinv(a, b, p) - stats.beta.ppf(p, a, b)) < 1e-9
