"""Noise samplers: where stochastic samplers get their fresh Gaussian noise.

A noise sampler is a callable `noise_sampler(sigma, sigma_next) -> Tensor` shaped like x
(k-diffusion's convention, `k_diffusion/sampling.py`).

- `default_noise_sampler(x, seed)`: independent N(0, I) draws per call, for ancestral samplers.
  With a seed the draws come from a CPU `torch.Generator` in float32 and are then moved to x's
  device and dtype, so one seed gives the same noise on every device and at every precision.
- `BrownianNoiseSampler`: increments of one Brownian motion W over the noise level, normalised
  to unit variance, `(W(t1) - W(t0)) / sqrt(|t1 - t0|)`, for SDE samplers (the role of
  k-diffusion's `BrownianTreeNoiseSampler`, without torchsde). W is sampled exactly, by Brownian
  bridges (e.g. Revuz & Yor, "Continuous Martingales and Brownian Motion", ch. I): a new time is
  drawn conditioned on its nearest already-sampled neighbours, so increments over overlapping or
  nested intervals stay consistent, as an SDE solver's substeps need.

Seeds are an int, or a sequence of ints with one per batch item (each item then gets the noise
it would get alone in a batch of one). `seed=None` uses torch's global RNG.
"""
import bisect
import math

import torch


def _generators(seed, batch_size):
    """One CPU generator for an int seed, or one per batch item for a sequence of seeds."""
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    seeds = [int(s) for s in seed]
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size}")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _cpu_randn(shape, generators):
    """float32 N(0, I) of `shape` on the CPU from `_generators` output."""
    if isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, dtype=torch.float32)
    items = [torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(items)  # B x [C, H, W] -> [B, C, H, W]


def default_noise_sampler(x, seed=None):
    """Fresh N(0, I) noise shaped like `x` at every call.

    With a seed, draws are float32 from CPU generator(s) seeded once here, then moved to x's device
    and dtype; without one, `torch.randn_like(x)` (the global RNG of x's device).
    """
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    generators = _generators(seed, x.shape[0])

    def sample(sigma, sigma_next):
        return _cpu_randn(x.shape, generators).to(x.device, x.dtype)

    return sample


class BrownianNoiseSampler:
    """Normalised increments of one seeded Brownian motion W(t), t = transform(sigma).

    Args:
        x: the tensor whose shape, device and dtype the noise takes.
        sigma_min, sigma_max: the noise-level range the sampler will query (W(transform(sigma_min))
            is pinned to 0 and W(transform(sigma_max)) is drawn first; queries outside the range
            extend the path with independent increments).
        seed: int, sequence of ints (one per batch item) or None (drawn from torch's global RNG).
        transform: maps sigma to the Brownian time (identity by default, as ComfyUI).

    `self(sigma, sigma_next)` returns `(W(t1) - W(t0)) / sqrt(|t1 - t0|)`. The path is exact
    Brownian motion and deterministic for a seed and an order of queries. Every sampled time keeps
    one float32 copy of x on the CPU (about two or three per sampling step).
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=None):
        self.transform = (lambda sigma: sigma) if transform is None else transform
        self.shape, self.device, self.dtype = x.shape, x.device, x.dtype
        if seed is None:
            seed = int(torch.randint(0, 2 ** 63 - 1, []))
        self._generators = _generators(seed, x.shape[0])
        t_lo, t_hi = sorted((self._time(sigma_min), self._time(sigma_max)))
        self._times = [t_lo]
        self._values = [torch.zeros(x.shape, dtype=torch.float32)]
        if t_hi > t_lo:
            self._w(t_hi)

    def _time(self, sigma):
        return float(self.transform(torch.as_tensor(sigma, dtype=torch.float64)))

    def _w(self, t):
        """W(t), drawn on first use conditioned on the nearest sampled times on each side."""
        i = bisect.bisect_left(self._times, t)
        if i < len(self._times) and self._times[i] == t:
            return self._values[i]
        z = _cpu_randn(self.shape, self._generators)
        if i == 0:  # before every sampled time: a free increment backwards
            t_b, w_b = self._times[0], self._values[0]
            value = w_b - math.sqrt(t_b - t) * z
        elif i == len(self._times):  # after every sampled time: a free increment forwards
            t_a, w_a = self._times[-1], self._values[-1]
            value = w_a + math.sqrt(t - t_a) * z
        else:  # Brownian bridge between the neighbours
            t_a, w_a = self._times[i - 1], self._values[i - 1]
            t_b, w_b = self._times[i], self._values[i]
            frac = (t - t_a) / (t_b - t_a)
            value = w_a + frac * (w_b - w_a) + math.sqrt((t - t_a) * (t_b - t) / (t_b - t_a)) * z
        self._times.insert(i, t)
        self._values.insert(i, value)
        return value

    def __call__(self, sigma, sigma_next):
        t0, t1 = self._time(sigma), self._time(sigma_next)
        if t0 == t1:
            raise ValueError("a Brownian increment needs two distinct noise levels")
        w0 = self._w(t0)
        w1 = self._w(t1)
        increment = (w1 - w0) / math.sqrt(abs(t1 - t0))
        return increment.to(self.device, self.dtype)
