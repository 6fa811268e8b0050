"""The inverse regularised incomplete beta function, for the `beta` noise schedule.

The `beta` schedule (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173, as used by
ComfyUI's `beta_scheduler`) places timesteps at quantiles of a Beta(alpha, beta) distribution. The
runtime must not depend on scipy, so the quantile function is computed here in float64:

- I_x(a, b) by the continued fraction of DLMF 8.17.22, evaluated with the modified Lentz algorithm
  (W. J. Lentz 1976; Thompson & Barnett 1986), using I_x(a, b) = 1 - I_{1-x}(b, a) where the
  fraction converges slowly (x > (a + 1) / (a + b + 2), DLMF 8.17.4);
- its inverse by Newton's method on I_x(a, b) - p (the derivative is the Beta density),
  safeguarded by bisection so that every iterate stays inside a shrinking bracket.
"""
import math

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 300


def _lentz_fraction(a, b, x):
    """1 / (1 + d1 / (1 + d2 / (1 + ...))) with the d_m of DLMF 8.17.22."""
    f = 1.0
    c = 1.0
    d = 0.0
    for m in range(1, _MAX_ITER):
        k = m // 2
        if m % 2:  # d_{2k+1}
            num = -(a + k) * (a + b + k) * x / ((a + 2 * k) * (a + 2 * k + 1))
        else:  # d_{2k}
            num = k * (b - k) * x / ((a + 2 * k - 1) * (a + 2 * k))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + num / c
        c = c if abs(c) > _TINY else _TINY
        f *= c * d
        if abs(c * d - 1.0) < _EPS:
            break
    return 1.0 / f


def _log_beta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def betainc(a, b, x):
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b) - math.log(a)
    return math.exp(log_front) * _lentz_fraction(a, b, x)


def betaincinv(a, b, p):
    """x such that I_x(a, b) = p (the Beta(a, b) quantile function), to float64 precision."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_norm = -_log_beta(a, b)
    lo, hi = 0.0, 1.0
    x = 0.5
    for _ in range(_MAX_ITER):
        f = betainc(a, b, x) - p
        if f == 0.0:
            return x
        if f > 0.0:
            hi = x
        else:
            lo = x
        density = math.exp(log_norm + (a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x))
        x_new = x - f / density
        if not lo < x_new < hi:
            x_new = 0.5 * (lo + hi)
        if abs(x_new - x) <= 4.0 * _EPS * x_new or hi - lo <= 4.0 * _EPS * hi:
            return x_new
        x = x_new
    return x
