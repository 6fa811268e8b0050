"""Samplers, denoiser adapters and noise samplers against independent references.

The model is a toy with a closed form: data x0 is an elementwise mixture of Gaussians, so
D(x, sigma) = E[x0 | x0 + sigma * n = x] is exact and nonlinear. References:
- k-diffusion's `sampling.py` (loaded by file, `tests/_kdiffusion.py`), run in float64 on the same
  model, sigmas and noise sampler: agreement to float64 round-off;
- diffusers' schedulers, driven step by step with the same model and noise, in their float32;
  diffusers' VP samples are converted with x_ve = x_vp * sqrt(1 + sigma^2) (x_vp = x_ve at sigma 0);
- k-diffusion's `external.py` denoiser wrappers for `make_denoiser`.
"""
import math
import types

import pytest
import torch

from _kdiffusion import kdiff  # noqa: F401  (session fixture)
from sdfast.sampling import (
    SAMPLERS,
    BrownianNoiseSampler,
    EpsDenoiser,
    ModelSampling,
    VDenoiser,
    default_noise_sampler,
    get_sampler,
    get_sigmas,
    make_denoiser,
)

# diffusers' schedulers trip NumPy 2 deprecations of torch's __array__ protocol (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
SHAPE = (2, 4, 8, 8)
REQUIRED = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral",
            "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "ddpm", "uni_pc", "lcm"]
STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde", "ddpm", "lcm"]
# Same algorithm, same inputs, float64 on both sides: the only differences are round-off in a
# different order of operations, ~1e-15 relative per op over <= 30 model calls on values <= 15.
TOL64 = 1e-10
# float32 on both sides, operations in a different order: our samplers' own float32-vs-float64
# error on this toy is <= 5.2e-6 (measured, uni_pc bh1 the worst) and diffusers' is of the same
# size (measured max difference 3e-6), so 2e-5 bounds the round-off; distinct samplers on the
# same schedule differ by > 0.1 here.
TOL32 = 2e-5


class Mixture:
    """Exact denoiser for x0 ~ sum_k w_k N(mu_k, s^2) per element; records each call's kwargs."""

    def __init__(self, means=(-1.0, 0.5, 2.0), weights=(0.3, 0.5, 0.2), std=0.3):
        self.means, self.log_w, self.var0 = means, [math.log(w) for w in weights], std ** 2
        self.calls = []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append(kwargs)
        mu = x.new_tensor(self.means)  # [K]
        sigma2 = sigma.to(x.dtype).reshape(-1, *([1] * x.ndim)) ** 2  # [B] -> [B, 1, 1, 1, 1]
        var = self.var0 + sigma2
        xk = x[..., None]  # [B, C, H, W] -> [B, C, H, W, 1]
        resp = torch.softmax(x.new_tensor(self.log_w) - 0.5 * (xk - mu) ** 2 / var, dim=-1)
        posterior_mean = mu + self.var0 / var * (xk - mu)
        return (resp * posterior_mean).sum(-1)  # [B, C, H, W, K] -> [B, C, H, W]


@pytest.fixture(scope="module")
def ms():
    return ModelSampling()


def _start(sigma0, dtype, seed=0):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (noise * float(sigma0)).to(dtype)


def _gaussian_noise(seed, dtype):
    """A noise sampler drawing from its own generator: equal draws for an equal call sequence."""
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen, dtype=torch.float32).to(dtype)


# ---------------------------------------------------------------- k-diffusion, float64

KD_CASES = [
    ("euler", {}, None), ("heun", {}, None), ("dpm_2", {}, None), ("lms", {}, None), ("dpmpp_2m", {}, None),
    ("euler_ancestral", {}, "gaussian"), ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "gaussian"),
    ("dpm_2_ancestral", {}, "gaussian"), ("dpmpp_2s_ancestral", {"eta": 0.7}, "gaussian"),
    ("dpmpp_sde", {}, "brownian"), ("dpmpp_sde", {"eta": 0.5, "r": 0.3}, "brownian"),
    ("dpmpp_2m_sde", {}, "brownian"), ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.6}, "brownian"),
    ("dpmpp_3m_sde", {}, "brownian"), ("dpmpp_3m_sde", {"eta": 0.4, "s_noise": 1.1}, "brownian"),
]


def _noise_for(kind, x, sigmas):
    if kind == "gaussian":
        return {"noise_sampler": _gaussian_noise(11, x.dtype)}
    if kind == "brownian":
        return {"noise_sampler": BrownianNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=11)}
    return {}


def _run_recorded(fn, x, sigmas, kwargs, noise_kind):
    model, steps = Mixture(), []
    cond = torch.ones(3, dtype=torch.float64)
    out = fn(model, x.clone(), sigmas, extra_args={"cond": cond}, callback=steps.append,
             **kwargs, **_noise_for(noise_kind, x, sigmas))
    assert all(call["cond"] is cond for call in model.calls)
    return out, steps, len(model.calls)


@pytest.mark.parametrize("name,kwargs,noise_kind", KD_CASES)
def test_matches_kdiffusion(name, kwargs, noise_kind, ms, kdiff):
    sigmas = get_sigmas("karras", ms, 12).double()
    x = _start(sigmas[0], torch.float64)
    ours, our_steps, our_calls = _run_recorded(SAMPLERS[name], x, sigmas, kwargs, noise_kind)
    ref, ref_steps, ref_calls = _run_recorded(getattr(kdiff.sampling, f"sample_{name}"), x, sigmas, kwargs,
                                              noise_kind)
    assert our_calls == ref_calls
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL64)
    assert len(our_steps) == len(ref_steps) == len(sigmas) - 1
    for a, b in zip(our_steps, ref_steps):
        assert a.keys() == b.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"} and a["i"] == b["i"]
        for key in ("x", "denoised", "sigma", "sigma_hat"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOL64)
    assert (ours - x).abs().max() > 1.0  # the run moved far from its start


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_churn_matches_kdiffusion(name, ms, kdiff):
    # Without a seed the churn noise is randn_like(x), as in k-diffusion, so equal global seeds give
    # equal draws (every step churns: s_tmin = 0, s_tmax = inf).
    sigmas = get_sigmas("normal", ms, 8).double()
    x = _start(sigmas[0], torch.float64)
    kwargs = {"s_churn": 2.0, "s_noise": 1.003}
    torch.manual_seed(3)
    ours = SAMPLERS[name](Mixture(), x.clone(), sigmas, **kwargs)
    torch.manual_seed(3)
    ref = getattr(kdiff.sampling, f"sample_{name}")(Mixture(), x.clone(), sigmas, **kwargs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL64)
    plain = SAMPLERS[name](Mixture(), x.clone(), sigmas)
    assert (plain - ours).abs().max() > 1e-2  # churn did something


def test_lms_coefficients_match_quadrature(kdiff):
    t = [14.6, 9.7, 6.1, 3.3, 1.9, 0.7]
    from sdfast.sampling import linear_multistep_coeff

    for order in (1, 2, 3, 4):
        for i in range(order - 1, len(t) - 1):
            for j in range(order):
                # scipy quad on a cubic is exact to round-off (21-point Gauss-Kronrod)
                ref = kdiff.sampling.linear_multistep_coeff(order, t, i, j)
                assert abs(linear_multistep_coeff(order, t, i, j) - ref) < 1e-12
    with pytest.raises(ValueError):
        linear_multistep_coeff(3, t, 1, 0)


# ---------------------------------------------------------------- diffusers, float32

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_VP_BY_TIMESTEP = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler")
_VP_BY_INDEX = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def _model_sigma(sched, t, i):
    """The noise level diffusers evaluates the model at in this call (its own state)."""
    name = type(sched).__name__
    second = not getattr(sched, "state_in_first_order", True)
    if name == "KDPM2DiscreteScheduler" and second:
        return sched.sigmas_interpol[sched.step_index]
    if name == "KDPM2AncestralDiscreteScheduler" and second:
        return sched.sigmas_interpol[sched.step_index - 1]
    if name == "DPMSolverSDEScheduler" and second:
        return sched.mid_point_sigma
    if name in _VP_BY_TIMESTEP:
        abar = sched.alphas_cumprod[int(t)]
        return ((1 - abar) / abar).sqrt()
    if name in _VP_BY_INDEX:
        return sched.sigmas[i]
    return sched.sigmas[sched.step_index]


def _our_sigmas(sched):
    """The plain noise-level list diffusers' schedule walks (final 0 included)."""
    name = type(sched).__name__
    if name in _VP_BY_TIMESTEP:
        abar = sched.alphas_cumprod[sched.timesteps.long()]
        return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1)]).float()
    return torch.unique_consecutive(sched.sigmas.float())  # 2nd-order schedulers repeat sigmas


def _run_diffusers(sched, model, x_ve, step_kwargs):
    """Drive `sched` with the eps of `model`; returns the final sample in VE variables."""
    vp = type(sched).__name__ in _VP_BY_TIMESTEP + _VP_BY_INDEX
    sigma0 = float(_our_sigmas(sched)[0])
    x = x_ve / math.sqrt(1 + sigma0 ** 2) if vp else x_ve.clone()
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)  # initialises the step index of k-style schedulers
        sigma = _model_sigma(sched, t, i).float()
        x_in = x * (1 + sigma ** 2).sqrt() if vp else x
        eps = (x_in - model(x_in, sigma.expand(x.shape[0]))) / sigma
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
    sigma_last = float(_our_sigmas(sched)[-1])  # 0, or sigma_min for final_sigmas_type="sigma_min"
    return x * math.sqrt(1 + sigma_last ** 2) if vp else x


def _diffusers_case(name):
    import diffusers as d

    def gen():
        return {"generator": torch.Generator().manual_seed(5)}

    cases = {
        "euler": (d.EulerDiscreteScheduler, {}, {}, None),
        "euler_ancestral": (d.EulerAncestralDiscreteScheduler, {}, gen, "generator"),
        "heun": (d.HeunDiscreteScheduler, {}, {}, None),
        "dpm_2": (d.KDPM2DiscreteScheduler, {}, {}, None),
        "dpm_2_ancestral": (d.KDPM2AncestralDiscreteScheduler, {}, gen, "generator"),
        "lms": (d.LMSDiscreteScheduler, {}, {}, None),
        "dpmpp_sde": (d.DPMSolverSDEScheduler, {}, {}, "brownian"),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, {}, None),
        "dpmpp_2m_sde": (d.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, gen, "generator"),
        "ddim": (d.DDIMScheduler, {"clip_sample": False}, {}, None),
        "ddpm": (d.DDPMScheduler, {"clip_sample": False}, gen, "generator"),
        "uni_pc": (d.UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh1",
                                               "final_sigmas_type": "sigma_min"}, {}, None),
        "uni_pc_bh2": (d.UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh2"}, {}, None),
        # timestep_scaling -> inf turns LCM's boundary condition (c_skip -> 0, c_out -> 1) off,
        # leaving the sampler itself; the boundary scalings belong to the denoiser.
        "lcm": (d.LCMScheduler, {"timestep_scaling": 1e7}, gen, "generator"),
    }
    return cases[name]


DIFFUSERS_CASES = [("euler", 10), ("euler_ancestral", 10), ("heun", 8), ("dpm_2", 8), ("dpm_2_ancestral", 8),
                   ("lms", 12), ("dpmpp_sde", 8), ("dpmpp_2m", 12), ("dpmpp_2m_sde", 12), ("ddim", 10),
                   ("ddpm", 10), ("uni_pc", 10), ("uni_pc", 3), ("uni_pc_bh2", 10), ("uni_pc_bh2", 2),
                   ("lcm", 4)]


@pytest.mark.parametrize("name,steps", DIFFUSERS_CASES)
def test_matches_diffusers(name, steps):
    cls, config, step_kwargs, noise = _diffusers_case(name)
    sched = cls(**_BETAS, **config)
    sched.set_timesteps(steps)
    sigmas = _our_sigmas(sched)
    x = _start(sigmas[0], torch.float32)
    kwargs = {}
    if noise == "generator":  # diffusers draws float32 randn from its generator once per noisy step
        kwargs["noise_sampler"] = _gaussian_noise(5, torch.float32)
    elif noise == "brownian":  # diffusers' DPMSolverSDE takes a preset noise sampler as is
        sched.noise_sampler = BrownianNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=9)
        kwargs["noise_sampler"] = BrownianNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=9)
    ours = SAMPLERS[name](Mixture(), x.clone(), sigmas, **kwargs)
    ref = _run_diffusers(sched, Mixture(), x, step_kwargs() if callable(step_kwargs) else step_kwargs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL32)
    assert (ours - x).abs().max() > 1.0


def test_uni_pc_final_step_to_zero():
    # The bh1 diffusers case above ends at sigma_min because diffusers' bh1 multiplies by
    # B(h) = h = -inf on a final step to sigma 0 and returns NaN. Ours takes the h -> inf limit of
    # the first-order update, x = denoised, which bh2 reaches exactly (its diffusers case ends at 0).
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(**_BETAS, solver_order=3, solver_type="bh2")
    sched.set_timesteps(6)
    sigmas = _our_sigmas(sched)
    assert sigmas[-1] == 0
    x = _start(sigmas[0], torch.float32)
    steps = []
    out = SAMPLERS["uni_pc"](Mixture(), x.clone(), sigmas, callback=steps.append)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, steps[-1]["denoised"], rtol=0, atol=0)
    model = Mixture()
    SAMPLERS["uni_pc"](model, x.clone(), sigmas)
    assert len(model.calls) == len(sigmas) - 1  # one model call per step, as diffusers


# ---------------------------------------------------------------- denoiser adapters


class ToyUNet(torch.nn.Module):
    """A fixed nonlinear function of (x, t, context) standing in for a UNet (no `seed` kwarg)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, t, context=None):
        h = torch.einsum("oc,bchw->bohw", self.weight, x)  # mix channels
        out = torch.tanh(h) + torch.sin(t / 500.0)[:, None, None, None]
        return out if context is None else out + context.mean()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_matches_kdiffusion_wrappers(prediction, ms, kdiff):
    ms_p = ModelSampling(prediction=prediction)
    unet = ToyUNet()
    ours = make_denoiser(unet, ms_p)
    assert isinstance(ours, EpsDenoiser if prediction == "eps" else VDenoiser)
    assert isinstance(ours, torch.nn.Module) and ours.model_sampling is ms_p
    wrapper = {"eps": kdiff.external.DiscreteEpsDDPMDenoiser, "v": kdiff.external.DiscreteVDDPMDenoiser}
    ref = wrapper[prediction](unet, ms_p.alphas_cumprod.clone(), quantize=False)
    torch.manual_seed(0)
    sigma = torch.tensor([14.6, 3.0, 0.5, 0.03])
    x = torch.randn(4, 4, 8, 8) * sigma[:, None, None, None]
    context = torch.randn(2, 3)
    with torch.no_grad():
        got = ours(x, sigma, context=context, seed=123)  # seed is dropped before the UNet
        want = ref(x, sigma, context=context)
    # Both map sigma -> t through float32 log-sigmas (k-diffusion derives its sigmas from
    # alphas_cumprod in float32, ours in float64): t agrees to ~1e-4, which moves sin(t/500) by
    # 2e-7 and denoised = x - sigma * eps by < 3e-6 at sigma = 14.6; float32 rounding of outputs up
    # to ~40 adds ~4e-6. A t off by one timestep would move it by 3e-2 (at sigma 14.6).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_inverts_exact_prediction(prediction, ms):
    """A UNet that outputs the exact eps (or v) of the mixture must give back the mixture's D."""
    mixture = Mixture()

    def exact_unet(x_in, t):
        sigma = ms.sigma(t).double()[:, None, None, None]
        x = x_in * (sigma ** 2 + 1).sqrt()  # undo c_in
        x0 = mixture(x, sigma.flatten())
        eps = (x - x0) / sigma
        if prediction == "eps":
            return eps
        alpha, sigma_vp = 1 / (sigma ** 2 + 1).sqrt(), sigma / (sigma ** 2 + 1).sqrt()
        return alpha * eps - sigma_vp * x0  # v of Salimans & Ho (2022)

    denoiser = make_denoiser(exact_unet, ModelSampling(prediction=prediction))
    sigma = ms.sigmas[[999, 700, 300, 40]].double()  # on the table, so sigma(t(sigma)) is exact
    x = _start(1.0, torch.float64)[:1].expand(4, -1, -1, -1) * sigma[:, None, None, None]
    # sigma(t(sigma)) round-trips through float32 log-sigmas: relative error ~1e-7 of sigma
    torch.testing.assert_close(denoiser(x, sigma), mixture(x, sigma), rtol=1e-5, atol=1e-5)


def test_make_denoiser_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="eps"):
        make_denoiser(ToyUNet(), types.SimpleNamespace(prediction="x0"))


# ---------------------------------------------------------------- noise samplers


def _reference_randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_default_noise_is_seeded_cpu_float32(dtype):
    x = torch.zeros(SHAPE, dtype=dtype)
    sampler = default_noise_sampler(x, 42)
    first, second = sampler(1.0, 0.5), sampler(0.5, 0.2)
    gen = torch.Generator("cpu").manual_seed(42)
    expected = [torch.randn(SHAPE, generator=gen, dtype=torch.float32) for _ in range(2)]
    assert first.dtype == dtype and first.device == x.device
    torch.testing.assert_close(first, expected[0].to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(second, expected[1].to(dtype), rtol=0, atol=0)
    again = default_noise_sampler(x, 42)(1.0, 0.5)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(first, second)


def test_default_noise_device_independent():
    # The draws are made on the CPU whatever x's device; the meta device shows no computation
    # happens there (values cannot exist on it), and a CUDA device, if any, gets the CPU values.
    meta = default_noise_sampler(torch.empty(SHAPE, device="meta"), 7)(1.0, 0.5)
    assert meta.device.type == "meta" and meta.shape == SHAPE
    if torch.cuda.is_available():
        cuda = default_noise_sampler(torch.zeros(SHAPE, device="cuda"), 7)(1.0, 0.5)
        torch.testing.assert_close(cuda.cpu(), _reference_randn(7, SHAPE), rtol=0, atol=0)


def test_per_item_seeds():
    x = torch.zeros(SHAPE)
    batch = default_noise_sampler(x, [3, 4])(1.0, 0.5)
    torch.testing.assert_close(batch[0], _reference_randn(3, SHAPE[1:]), rtol=0, atol=0)
    torch.testing.assert_close(batch[1], _reference_randn(4, SHAPE[1:]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="seeds"):
        default_noise_sampler(x, [1, 2, 3])


def test_brownian_increments_are_consistent_and_seeded():
    x = torch.zeros(SHAPE, dtype=torch.float64)
    a, b, c = 8.0, 2.0, 0.5
    ns = BrownianNoiseSampler(x, 0.1, 10.0, seed=1)
    w_ab = ns(a, b) * math.sqrt(a - b)
    w_bc = ns(b, c) * math.sqrt(b - c)
    w_ac = ns(a, c) * math.sqrt(a - c)
    # one path: W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)), in float32 storage
    torch.testing.assert_close(w_ac, w_ab + w_bc, rtol=0, atol=1e-5)
    assert w_ac.dtype == torch.float64
    torch.testing.assert_close(ns(b, a), -ns(a, b), rtol=0, atol=0)
    replay = BrownianNoiseSampler(x, 0.1, 10.0, seed=1)
    torch.testing.assert_close(replay(a, b), ns(a, b), rtol=0, atol=0)
    assert not torch.equal(BrownianNoiseSampler(x, 0.1, 10.0, seed=2)(a, b), ns(a, b))


def test_brownian_statistics():
    # Exact Brownian motion: unit-variance increments, independent on disjoint intervals, and a
    # bridge point m in [lo, hi] has corr(W(m) - W(lo), W(hi) - W(lo)) = sqrt((m - lo) / (hi - lo)).
    n = 200_000  # statistical tolerance 0.02 is > 8 standard errors (1/sqrt(n) = 0.0022)
    x = torch.zeros(n)
    ns = BrownianNoiseSampler(x[None], 0.05, 12.0, seed=5)
    hi, lo, mid = 12.0, 3.0, 6.0
    outer = ns(hi, lo)[0]  # sampled before the midpoint exists
    first = ns(hi, mid)[0]  # bridge between the two
    later = ns(lo, 0.05)[0]  # disjoint interval
    for z in (outer, first, later):
        assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.02
    corr = torch.corrcoef(torch.stack([outer, first, later]))
    assert abs(corr[0, 1] - math.sqrt((hi - mid) / (hi - lo))) < 0.02
    assert abs(corr[0, 2]) < 0.02 and abs(corr[1, 2]) < 0.02


# ---------------------------------------------------------------- registry and contract


def test_registry_names_and_docstrings():
    for name in REQUIRED:
        fn = get_sampler(name)
        assert fn is SAMPLERS[name] and fn.__name__ == f"sample_{name}"
        assert fn.__doc__ and len(fn.__doc__) > 40


@pytest.mark.parametrize("bad", ["euler_a", "k_euler", ""])
def test_unknown_sampler_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        get_sampler(bad)
    for name in SAMPLERS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", REQUIRED)
def test_contract_callback_extra_args_seed(name, ms):
    sigmas = get_sigmas("karras", ms, 5)
    x = _start(sigmas[0], torch.float32)
    model, steps = Mixture(), []
    extra = {"seed": 17, "cond": "c"}
    out = get_sampler(name)(model, x.clone(), sigmas, extra_args=extra, callback=steps.append, disable=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert [s["i"] for s in steps] == list(range(len(sigmas) - 1))
    assert all(s.keys() == {"x", "i", "sigma", "sigma_hat", "denoised"} for s in steps)
    assert all(call == extra for call in model.calls)  # extra_args reach the model unchanged
    again = get_sampler(name)(Mixture(), x.clone(), sigmas, extra_args=dict(extra))
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # a seed makes any sampler reproducible
    other = get_sampler(name)(Mixture(), x.clone(), sigmas, extra_args={**extra, "seed": 18})
    assert torch.equal(other, out) == (name not in STOCHASTIC)
