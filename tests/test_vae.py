"""The LDM-named KL autoencoder (sdfast.models.vae) and its diffusers key map
(sdfast.io.diffusers_unet.vae_diffusers_to_ldm).

References, all independent of sdfast:
- diffusers' `AutoencoderKL` with seeded random weights (norms randomized too), run in fp32
  and fp64: `encode(x).latent_dist` (mean, logvar, sample) and `decode(z).sample`;
- diffusers' single-file converter `convert_ldm_vae_checkpoint` (LDM names -> diffusers names)
  and the LDM VAE names it lists in `DIFFUSERS_TO_LDM_MAPPING["vae"]`.

Tolerance: the earned bound of tests/test_unet.py (`_diffusers_models.earned_error`): our fp32
error against diffusers' fp64 run at most 2x diffusers' own fp32 error plus 4 fp32 ulps, 8x
where our 3x3 convolutions may run Winograd (`WINOGRAD_ERROR_FACTOR`, see tests/test_conv.py).
"""
import dataclasses
import gc

import pytest
import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_ldm_vae_checkpoint

from _diffusers_models import VAE_CONFIGS, WINOGRAD_ERROR_FACTOR, earned_error, float64_copy, make_vae
from sdfast.io.diffusers_unet import vae_diffusers_to_ldm
from sdfast.models.vae import AutoencoderKL, VAEConfig

PREFIX = "first_stage_model."
ATTN_WEIGHTS = ["q", "k", "v", "proj_out"]
OLD_ATTN_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def expected_config(name):
    """Our config for `VAE_CONFIGS[name]`, written from the diffusers arguments."""
    kw = VAE_CONFIGS[name]
    widths = kw["block_out_channels"]
    return VAEConfig(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                     num_res_blocks=kw["layers_per_block"], z_channels=kw["latent_channels"],
                     embed_dim=kw["latent_channels"], in_channels=kw["in_channels"],
                     out_channels=kw["out_channels"], norm_groups=kw.get("norm_num_groups", 32))


def load_ours(diffusers_model, config):
    with torch.device("meta"):
        model = AutoencoderKL(config)
    model.load_state_dict(vae_diffusers_to_ldm(diffusers_model.state_dict()), strict=True,
                          assign=True)
    return model.eval()


@torch.no_grad()
def run_diffusers(model, image, latent):
    dtype = next(model.parameters()).dtype
    dist = model.encode(image.to(dtype)).latent_dist
    return dist.mean, dist.logvar, model.decode(latent.to(dtype)).sample


@torch.no_grad()
def run_ours(model, image, latent):
    dist = model.encode(image)
    return dist.mean, dist.logvar, model.decode(latent)


def assert_parity(ours, refs32, refs64):
    for label, out, ref32, ref64 in zip(["mean", "logvar", "decode"], ours, refs32, refs64):
        err, bound = earned_error(out, ref32, ref64, factor=WINOGRAD_ERROR_FACTOR)
        assert err <= bound, f"{label}: max error {err:.3g} vs fp64 exceeds the bound {bound:.3g}"


def inputs(name, batch, h, w, seed=0):
    """An image `[B, Cin, h, w]` in [-1, 1] and a latent at 1/2**(levels-1) of its size."""
    kw = VAE_CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(kw["block_out_channels"]) - 1)
    image = torch.rand(batch, kw["in_channels"], h, w, generator=g) * 2 - 1
    latent = torch.randn(batch, kw["latent_channels"], h // f, w // f, generator=g)
    return image, latent


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_small_parity(size):
    torch.manual_seed(0)
    ref = make_vae("small")
    ours = load_ours(ref, expected_config("small"))
    image, latent = inputs("small", 2, *size)
    out = run_ours(ours, image, latent)
    assert out[0].shape == latent.shape and out[2].shape == image.shape
    assert_parity(out, run_diffusers(ref, image, latent),
                  run_diffusers(float64_copy(ref), image, latent))


def test_sample_draws_like_diffusers():
    """`sample(generator)` is mean + std * randn(generator), the same draw diffusers makes."""
    torch.manual_seed(0)
    ref = make_vae("small")
    ours = load_ours(ref, expected_config("small"))
    image, _ = inputs("small", 2, 32, 32)
    with torch.no_grad():
        dist, ref_dist = ours.encode(image), ref.encode(image).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    sample = dist.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, dist.mean + torch.exp(0.5 * dist.logvar) * eps,
                               rtol=0, atol=0)
    # diffusers draws the same eps from the same generator (fp32 round-off apart).
    ref_sample = ref_dist.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(ref_sample, ref_dist.mean + ref_dist.std * eps)
    assert dist.sample().shape == dist.mean.shape  # the default generator works too
    assert torch.equal(dist.mode(), dist.mean)


@pytest.mark.slow
def test_full_size_parity():
    """The SD VAE (128-512 channels) on a 32x32 image and a 4x4 latent."""
    torch.manual_seed(0)
    ref = make_vae("sd")
    ours = load_ours(ref, expected_config("sd"))
    image, latent = inputs("sd", 2, 32, 32)
    out = run_ours(ours, image, latent)
    del ours
    gc.collect()
    refs32 = run_diffusers(ref, image, latent)
    assert_parity(out, refs32, run_diffusers(ref.double(), image, latent))


# ---------------------------------------------------------------- key layout and key map

# LDM VAE names listed by diffusers' converter, and names of real SD checkpoints.
SD_REAL_KEYS = sorted(set(DIFFUSERS_TO_LDM_MAPPING["vae"].values()) | {
    "encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.q.weight",
    "encoder.mid.block_2.conv2.bias", "decoder.up.3.upsample.conv.weight",
    "decoder.up.0.block.2.conv2.weight", "decoder.mid.attn_1.proj_out.weight",
})


def ldm_checkpoint(name):
    with torch.device("meta"):
        model = AutoencoderKL(expected_config(name))
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def test_keys_are_real_single_file_keys():
    ckpt = ldm_checkpoint("sd")
    assert not [k for k in SD_REAL_KEYS if PREFIX + k not in ckpt]
    # LDM's attention projections are 1x1 convs.
    assert ckpt[PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


@pytest.mark.parametrize("name", ["sd", "small"])
def test_diffusers_converter_maps_our_keys_onto_its_model(name):
    ckpt = ldm_checkpoint(name)
    ref = make_vae(name, device="meta")
    converted = convert_ldm_vae_checkpoint(ckpt, dict(ref.config))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ckpt) == len(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_key_map_round_trip_and_no_copies():
    """diffusers -> (ours) LDM -> (diffusers' converter) diffusers gives back every value; the
    LDM tensors share storage with the diffusers ones (renaming and views only)."""
    ref = make_vae("small")
    sd = ref.state_dict()
    ldm = vae_diffusers_to_ldm(sd)
    assert {v.data_ptr() for v in ldm.values()} == {v.data_ptr() for v in sd.values()}
    for part in ["encoder", "decoder"]:
        for name in ATTN_WEIGHTS:
            weight = ldm[f"{part}.mid.attn_1.{name}.weight"]
            assert weight.dim() == 4 and weight.shape[2:] == (1, 1)
    back = convert_ldm_vae_checkpoint({PREFIX + k: v for k, v in ldm.items()}, dict(ref.config))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) and back[k].data_ptr() == sd[k].data_ptr() for k in sd)


def test_key_map_accepts_old_attention_names():
    """diffusers < 0.14 named the VAE attention `query/key/value/proj_attn`: each old name maps
    to the LDM tensor of its new name (real weights, each its own storage and values, so a
    swapped query/key fails)."""
    sd = make_vae("small").state_dict()
    assert len({v.data_ptr() for v in sd.values()}) == len(sd)
    old = {}
    for key, value in sd.items():
        for new_name, old_name in OLD_ATTN_NAMES.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[key] = value
    assert old.keys() != sd.keys()
    new_ldm, old_ldm = vae_diffusers_to_ldm(sd), vae_diffusers_to_ldm(old)
    assert new_ldm.keys() == old_ldm.keys()
    for k in new_ldm:
        assert old_ldm[k].data_ptr() == new_ldm[k].data_ptr() and torch.equal(old_ldm[k], new_ldm[k]), k
    # and by name, from the old keys themselves
    ldm_names = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
    for part in ["encoder", "decoder"]:
        for old_name, ldm_name in ldm_names.items():
            for param in ["weight", "bias"]:
                source = old[f"{part}.mid_block.attentions.0.{old_name}.{param}"]
                mapped = old_ldm[f"{part}.mid.attn_1.{ldm_name}.{param}"]
                assert mapped.data_ptr() == source.data_ptr(), (part, old_name, param)
                assert torch.equal(mapped.reshape(source.shape), source), (part, old_name, param)


def test_key_map_rejects_unknown_keys():
    sd = make_vae("small", device="meta").state_dict()
    bad = dict(sd, **{"encoder.mid_block.attentions.0.norm_q.weight": torch.zeros(1),
                      "decoder.up_blocks.0.resnets.0.time_emb_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError) as info:
        vae_diffusers_to_ldm(bad)
    assert "attentions.0.norm_q.weight" in str(info.value)
    assert "time_emb_proj.weight" in str(info.value)


# ---------------------------------------------------------------- config and construction

@pytest.mark.parametrize("name", ["sd", "small"])
def test_detect_from_weights(name):
    sd = vae_diffusers_to_ldm(make_vae(name, device="meta").state_dict())
    detected = VAEConfig.detect_from_weights(sd)
    # Norm groups are not in the weights: every LDM VAE uses 32, the small test model 8.
    assert detected == dataclasses.replace(expected_config(name), norm_groups=32)


def test_detect_rejects_other_layouts():
    ckpt = ldm_checkpoint("small")
    with pytest.raises(ValueError, match="first_stage_model"):
        VAEConfig.detect_from_weights(ckpt)
    sd = {k[len(PREFIX):]: v for k, v in ckpt.items()}
    with pytest.raises(ValueError, match="outside the middle"):
        VAEConfig.detect_from_weights(dict(sd, **{"encoder.down.1.attn.0.q.weight": torch.zeros(1)}))
    single_z = dict(sd, **{"encoder.conv_out.weight": torch.zeros(4, 64, 3, 3)})
    with pytest.raises(ValueError, match="KL"):
        VAEConfig.detect_from_weights(single_z)


def test_meta_construction_has_only_checkpoint_keys():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    assert not list(model.buffers())
    assert model.state_dict().keys() == dict(model.named_parameters()).keys()
    assert all(p.is_meta for p in model.parameters())
