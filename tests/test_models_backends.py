"""The runtime's UNet and VAE give the reference backend's output with every backend
available here forced (small random models; the earned tolerance of tests/test_unet.py:
against the float64 reference run, at most twice the reference's own fp32 error plus a few
fp32 ulps of the output's magnitude)."""
import copy

import pytest
import torch

from _diffusers_models import WINOGRAD_ERROR_FACTOR, earned_error
from sdfast import ops
from sdfast.models.unet import UNetConfig, UNetModel
from sdfast.models.vae import AutoencoderKL, VAEConfig

BACKENDS = [b for b in ops.backends("attention") if b != "reference"]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no accelerated backend here")


def _runs(model, fn, backend):
    """(out with backend forced, fp32 reference, float64 reference)."""
    with torch.no_grad():
        with ops.use_backend(backend):
            out = fn(model, torch.float32)
        with ops.use_backend("reference"):
            ref32 = fn(model, torch.float32)
            ref64 = fn(copy.deepcopy(model).double(), torch.float64)
    return out, ref32, ref64


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(0, 1), context_dim=48, head_dim=8, norm_groups=8)
    return UNetModel(cfg).eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_matches_reference_backend(unet, backend, channels_last):
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 77, 48, generator=g)
    t = torch.tensor([10.0, 700.0])
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def fn(model, dtype):
        return model(x.to(dtype).contiguous(memory_format=fmt), t.to(dtype), ctx.to(dtype))

    out, ref32, ref64 = _runs(unet, fn, backend)
    err, bound = earned_error(out, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
    assert err <= bound, f"UNet with {backend}: max|out - ref64| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vae_decode_matches_reference_backend(vae, backend):
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(3))

    def fn(model, dtype):
        return model.decode(z.to(dtype))

    out, ref32, ref64 = _runs(vae, fn, backend)
    err, bound = earned_error(out, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
    assert err <= bound, f"VAE with {backend}: max|out - ref64| = {err:.3g} > {bound:.3g}"
