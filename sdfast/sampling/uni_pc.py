"""UniPC: unified predictor-corrector multistep sampling (Zhao et al. 2023, arXiv:2302.04867).

The data-prediction (x0) form with B(h) = h ("bh1", ComfyUI's `uni_pc`) or B(h) = e^h - 1
("bh2", ComfyUI's `uni_pc_bh2`, diffusers' default), written in k-diffusion's VE variables. With
lambda = -log(sigma) and h = lambda_next - lambda_0, the UniPC-p update of the paper's Algorithm
(eq. 8, with the VP factor alpha_t divided out since x = x_vp / alpha) is

    x_base = (sigma_next / sigma_0) x - expm1(-h) m0
    x_next = x_base - B(h) * sum_k rho_k D_k,     D_k = (m_k - m0) / r_k,

where m0, m1, ... are the newest model outputs (denoised), r_k = (lambda_k - lambda_0) / h. The
predictor (UniP) uses the past outputs; the corrector (UniC) adds D = m(x_pred) - m0 with r = 1
and reuses that model evaluation for the next step, so a step costs one model call. Step orders
warm up as 1, 2, ... and drop back to 1 on the final step (`lower_order_final`, as ComfyUI and
diffusers); the final step has no corrector.
"""
import math

import torch

from .samplers import _report, _setup


def _coefficients(h, rks, variant):
    """(B(h), expm1(-h), rhos_p, rhos_c) for one step; rks ends with 1 and has the step order."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    order = len(rks)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        # order 2 uses rho_p = 1/2 instead of the solve, as the reference implementation
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        rhos_c = torch.linalg.solve(R, b).tolist()
    return b_h, h_phi_1, rhos_p, rhos_c


def _predict(x, history, sigma_next, variant):
    """UniP step from history[-1] to sigma_next. Returns (x_pred, x_base, D list, coefficients)."""
    sigma_0, m0 = history[-1]
    h = math.log(sigma_0 / sigma_next)
    older = history[-2::-1]  # newest-but-one first
    rks = [math.log(sigma_0 / sigma_k) / h for sigma_k, _ in older] + [1.0]
    b_h, h_phi_1, rhos_p, rhos_c = _coefficients(h, rks, variant)
    ds = [(m_k - m0) / rk for (_, m_k), rk in zip(older, rks)]
    x_base = (sigma_next / sigma_0) * x - h_phi_1 * m0
    x_pred = x_base
    if rhos_p:
        x_pred = x_base - b_h * sum(rho * d for rho, d in zip(rhos_p, ds))
    return x_pred, x_base, ds, (b_h, rhos_c)


def _correct(x_base, ds, m0, m_next, coefficients):
    """UniC: redo the step with the model output at the predicted point as the newest derivative."""
    b_h, rhos_c = coefficients
    residual = sum(rho * d for rho, d in zip(rhos_c[:-1], ds)) + rhos_c[-1] * (m_next - m0)
    return x_base - b_h * residual


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1", order=3):
    """UniPC multistep predictor-corrector (Zhao et al. 2023, arXiv:2302.04867), data prediction,
    order up to `order` (3 as ComfyUI), `variant` "bh1" (ComfyUI `uni_pc`) or "bh2".

    A final sigma of 0 is reached by the h -> inf limit of the first-order update, x = denoised
    (ComfyUI instead stops at sigma = 0.001)."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args, s_in = _setup(x, extra_args)
    sig = sigmas.detach().cpu().tolist()
    n = len(sig) - 1
    history = [(sig[0], model(x, sigmas[0] * s_in, **extra_args))]  # (sigma, denoised), newest last
    for i in range(n):
        _report(callback, x, i, sigmas[i], sigmas[i], history[-1][1])
        if sig[i + 1] == 0:
            return history[-1][1]
        step_order = min(order, i + 1, n - i)
        x_pred, x_base, ds, coefficients = _predict(x, history[-step_order:], sig[i + 1], variant)
        if i == n - 1:  # no corrector after the last model call
            return x_pred
        denoised = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        x = _correct(x_base, ds, history[-1][1], denoised, coefficients)
        history = (history + [(sig[i + 1], denoised)])[-order:]
    return x


@torch.no_grad()
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023; ComfyUI's `uni_pc_bh2`)."""
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
