"""SD1 / SD2 text encoders (sdfast.models.clip) and their diffusers key maps (sdfast.io.diffusers_clip).

References, all independent of sdfast:
- transformers.CLIPTextModel (eager attention, explicit causal mask) run in fp32 and fp64;
- diffusers' single-file converter `convert_open_clip_checkpoint` (LDM OpenCLIP -> HF names);
- the LDM key layout, written out below from the documented names (FrozenCLIPEmbedder stores
  transformers' CLIPTextModel under `cond_stage_model.transformer.`, FrozenOpenCLIPEmbedder stores
  open_clip's text tower under `cond_stage_model.model.`).

Tolerance (flash-attention's rule, "earned, not guessed"): against the fp64 run of the reference
model, our fp32 error may be at most 2x transformers' own fp32 error, plus a floor of 4 fp32 ulps
of the output scale (for when the reference's error happens to be tiny). Both fp32 runs do the
same math in a different order (fused SDPA vs eager softmax), so their round-off is of one size.
"""
import pytest
import torch
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from sdfast.io.diffusers_clip import (clip_diffusers_to_ldm, clip_ldm_to_diffusers,
                                      openclip_diffusers_to_ldm, openclip_ldm_to_diffusers)
from sdfast.models.clip import (CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig,
                                OpenCLIPTextModel)

# transformers CLIPTextConfig sizes. SMALL has 64-wide heads like the real towers (heads = width // 64).
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
             max_position_embeddings=16, vocab_size=1000)
SD1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
           max_position_embeddings=77, vocab_size=49408)
SD2_DIFFUSERS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                     num_attention_heads=16, max_position_embeddings=77, vocab_size=49408)
SD1_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")


# ---- reference models and helpers -------------------------------------------------------------

def _randomize(model, seed):
    """Weights of unit-scale activations (transformers' init is too gentle to expose e.g. swapped
    q/k): matrices N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if p.dim() == 2:
                p.copy_(noise * p.shape[1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _hf_model(sizes, act, seed):
    vocab = sizes["vocab_size"]
    cfg = HFCLIPTextConfig(**sizes, hidden_act=act, attn_implementation="eager",
                           bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = HFCLIPTextModel(cfg).eval()
    _randomize(model, seed)
    return model


def _hf_state(hf):
    """transformers 5 saves CLIPTextModel without `text_model.`; make sure of it."""
    sd = hf.state_dict()
    assert not any(k.startswith("text_model.") for k in sd)
    return sd


def _ids(vocab, batch, length, seed):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_out(hf, ids, clip_skip):
    """A1111's clip skip on transformers: final_layer_norm(hidden_states[-clip_skip])."""
    out = hf(ids, output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state
    return hf.final_layer_norm(out.hidden_states[-clip_skip])


def _hf_runs(hf, ids, skips):
    """{clip_skip: (fp32 output, fp64 output)} of `hf`. Converts `hf` to float64 in place (so
    real-size tests need no second copy)."""
    out32 = {k: _hf_out(hf, ids, k) for k in skips}
    hf.double()
    return {k: (out32[k], _hf_out(hf, ids, k)) for k in skips}


def _assert_close(ours, hf32, ref64):
    assert ours.shape == ref64.shape and ours.dtype == hf32.dtype
    err_hf = (hf32.double() - ref64).abs().max().item()
    err = (ours.double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err <= 2 * err_hf + floor, (err, err_hf, floor)


def _build(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    assert all(p.is_meta for p in model.parameters())
    return model


def _load(model_cls, config, sd):
    """As the loader does: build on meta, then load the (strict) state dict with assign=True."""
    model = _build(model_cls, config)
    model.load_state_dict(sd, assign=True)
    return model.eval()


@torch.no_grad()
def _ours(model, ids, skips):
    return {k: model(ids, clip_skip=k) for k in skips}


# ---- the documented LDM key layout ------------------------------------------------------------

def _ldm_sd1_keys(layers):
    """Keys after `cond_stage_model.transformer.` in an SD1 LDM checkpoint (minus position_ids)."""
    keys = {"text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"}
    for i in range(layers):
        for module in SD1_LAYER_MODULES:
            keys |= {f"text_model.encoder.layers.{i}.{module}.weight",
                     f"text_model.encoder.layers.{i}.{module}.bias"}
    return keys


def _ldm_sd2_keys(layers, projection=True, logit_scale=True):
    """Keys after `cond_stage_model.model.` in an SD2 LDM checkpoint (open_clip text tower)."""
    keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    keys |= {"text_projection"} if projection else set()
    keys |= {"logit_scale"} if logit_scale else set()
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        keys |= {block + "attn.in_proj_weight", block + "attn.in_proj_bias"}
        for module in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= {block + module + ".weight", block + module + ".bias"}
    return keys


def _native_openclip(hf_sd, seed, projection_dim):
    """A native-LDM-style SD2 text tower written out by hand from an HF one: the same blocks in
    open_clip names, plus one extra random block at the end (the one SD2 never runs),
    `text_projection` and `logit_scale`."""
    n = 1 + max(int(k.split(".")[2]) for k in hf_sd if k.startswith("encoder.layers."))
    sd = {"token_embedding.weight": hf_sd["embeddings.token_embedding.weight"],
          "positional_embedding": hf_sd["embeddings.position_embedding.weight"],
          "ln_final.weight": hf_sd["final_layer_norm.weight"],
          "ln_final.bias": hf_sd["final_layer_norm.bias"]}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(n):
        hf, ldm = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for t in ("weight", "bias"):
            sd[f"{ldm}attn.in_proj_{t}"] = torch.cat(
                [hf_sd[f"{hf}self_attn.{p}_proj.{t}"] for p in "qkv"])
            for o, h in renames.items():
                sd[f"{ldm}{o}.{t}"] = hf_sd[f"{hf}{h}.{t}"]
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in sd if k.startswith("transformer.resblocks.0.")]:
        extra = key.replace(".0.", f".{n}.", 1)
        sd[extra] = torch.randn(sd[key].shape, generator=gen) * (0.3 if sd[key].dim() == 1 else 0.05)
    width = sd["positional_embedding"].shape[1]
    sd["text_projection"] = torch.randn(width, projection_dim, generator=gen) * width ** -0.5
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


# ---- key layout and detection -----------------------------------------------------------------

def test_sd1_keys_are_the_ldm_keys():
    model = _build(CLIPTextModel, CLIPTextConfig())
    assert set(model.state_dict()) == _ldm_sd1_keys(12)
    assert not any("position_ids" in name for name, _ in model.named_buffers())
    assert model.token_embedding is model.text_model.embeddings.token_embedding


def test_sd2_keys_are_the_ldm_keys():
    model = _build(OpenCLIPTextModel, OpenCLIPTextConfig())
    assert set(model.state_dict()) == _ldm_sd2_keys(24)
    assert model.state_dict()["transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    assert model.state_dict()["text_projection"].shape == (1024, 1024)
    bare = _build(OpenCLIPTextModel, OpenCLIPTextConfig(projection_dim=None, logit_scale=False))
    assert set(bare.state_dict()) == _ldm_sd2_keys(24, projection=False, logit_scale=False)
    assert isinstance(model.token_embedding, torch.nn.Embedding)


def test_position_ids_is_dropped_not_loaded():
    """Many SD1 files carry `position_ids` (some as corrupted floats). It is not state: loaders
    drop `IGNORED_KEYS` (positions are 0..T-1, checked by the parity tests against transformers)."""
    cfg = CLIPTextConfig(vocab_size=100, width=64, layers=1, heads=1, positions=8, mlp_width=64)
    torch.manual_seed(21)
    sd = dict(CLIPTextModel(cfg).state_dict())
    ckpt = {**sd, "text_model.embeddings.position_ids": torch.arange(8.0)[None] * 0.999}
    with pytest.raises(RuntimeError, match="position_ids"):
        _load(CLIPTextModel, cfg, ckpt)
    assert set(CLIPTextModel.IGNORED_KEYS) == {"text_model.embeddings.position_ids"}
    model = _load(CLIPTextModel, cfg, {k: v for k, v in ckpt.items()
                                       if k not in CLIPTextModel.IGNORED_KEYS})
    assert OpenCLIPTextModel.IGNORED_KEYS == ()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("prefix", ["", "cond_stage_model.transformer."])
def test_sd1_detect_from_weights(prefix):
    cfg = CLIPTextConfig(vocab_size=1000, width=192, layers=5, heads=3, positions=20, mlp_width=320)
    sd = {prefix + k: v for k, v in _build(CLIPTextModel, cfg).state_dict().items()}
    assert CLIPTextConfig.detect_from_weights(sd, prefix=prefix) == cfg
    assert CLIPTextConfig.detect_from_weights(_build(CLIPTextModel, CLIPTextConfig()).state_dict()) \
        == CLIPTextConfig(vocab_size=49408, width=768, layers=12, heads=12, positions=77, mlp_width=3072)


@pytest.mark.parametrize("projection_dim,logit_scale", [(96, True), (None, False)])
def test_sd2_detect_from_weights(projection_dim, logit_scale):
    cfg = OpenCLIPTextConfig(vocab_size=1000, width=128, layers=4, heads=2, positions=16,
                             mlp_width=512, projection_dim=projection_dim, logit_scale=logit_scale)
    prefix = "cond_stage_model.model."
    sd = {prefix + k: v for k, v in _build(OpenCLIPTextModel, cfg).state_dict().items()}
    assert OpenCLIPTextConfig.detect_from_weights(sd, prefix=prefix) == cfg
    converted = OpenCLIPTextConfig.detect_from_weights(
        sd, prefix=prefix, skip_last_layers=0)
    assert converted.skip_last_layers == 0 and converted.layers == 4
    real = _build(OpenCLIPTextModel, OpenCLIPTextConfig()).state_dict()
    assert OpenCLIPTextConfig.detect_from_weights(real) == OpenCLIPTextConfig(
        vocab_size=49408, width=1024, layers=24, heads=16, positions=77, mlp_width=4096,
        skip_last_layers=1, projection_dim=1024, logit_scale=True)


def test_detect_rejects_gaps_and_foreign_weights():
    sd = _build(CLIPTextModel, CLIPTextConfig(layers=3)).state_dict()
    gappy = {k: v for k, v in sd.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match="0..n-1"):
        CLIPTextConfig.detect_from_weights(gappy)
    with pytest.raises(ValueError, match="token_embedding"):
        OpenCLIPTextConfig.detect_from_weights(sd)


def test_config_validation():
    with pytest.raises(ValueError, match="skip_last_layers"):
        OpenCLIPTextConfig(layers=2, skip_last_layers=2)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu6")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=100, heads=3)


# ---- key maps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["transformers5", "text_model_prefix", "with_position_ids"])
def test_clip_map_names_and_no_copies(layout):
    hf_sd = _hf_state(_hf_model(SMALL, "quick_gelu", seed=0))
    if layout != "transformers5":
        hf_sd = {"text_model." + k: v for k, v in hf_sd.items()}
    if layout == "with_position_ids":  # as in old diffusers folders; float, as some files have it
        hf_sd["text_model.embeddings.position_ids"] = torch.arange(16.0)[None] + 0.5
    ldm = clip_diffusers_to_ldm(hf_sd)
    assert set(ldm) == _ldm_sd1_keys(3)
    source = {k.removeprefix("text_model."): v for k, v in hf_sd.items()}
    for key, value in ldm.items():
        assert value is source[key.removeprefix("text_model.")]
    back = clip_ldm_to_diffusers(ldm)
    assert set(back) == {"text_model." + k for k in _hf_state(_hf_model(SMALL, "quick_gelu", 0))}


def test_clip_map_rejects_unknown_keys():
    hf_sd = _hf_state(_hf_model(SMALL, "quick_gelu", seed=0))
    hf_sd["text_model.encoder.layers.0.mlp.fc3.weight"] = torch.zeros(1)
    hf_sd["logit_scale"] = torch.zeros(())
    with pytest.raises(ValueError, match="no mapping") as info:
        clip_diffusers_to_ldm(hf_sd)
    assert "mlp.fc3" in str(info.value) and "logit_scale" in str(info.value)
    with pytest.raises(ValueError, match="two source keys"):
        clip_diffusers_to_ldm({**hf_sd, "text_model.final_layer_norm.bias": torch.zeros(1)})


def test_openclip_map_matches_hand_written_layout():
    hf_sd = _hf_state(_hf_model(SMALL, "gelu", seed=1))
    native = _native_openclip(hf_sd, seed=2, projection_dim=96)
    ldm = openclip_diffusers_to_ldm(hf_sd)
    assert set(ldm) == _ldm_sd2_keys(3, projection=False, logit_scale=False)
    for key, value in ldm.items():
        assert torch.equal(value, native[key]), key
    assert ldm["ln_final.weight"] is hf_sd["final_layer_norm.weight"]  # renamed, not copied


def test_openclip_map_agrees_with_diffusers_converter():
    """diffusers' own LDM -> HF converter, fed our output, must give back the HF weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    hf = _hf_model(SMALL, "gelu", seed=3)
    hf_sd = _hf_state(hf)
    ldm = {"cond_stage_model.model." + k: v for k, v in openclip_diffusers_to_ldm(hf_sd).items()}
    back = convert_open_clip_checkpoint(hf, ldm)
    assert set(back) == {"text_model." + k for k in hf_sd}
    for key, value in hf_sd.items():
        assert torch.equal(back["text_model." + key], value), key


def test_openclip_map_projection_and_round_trip():
    hf_sd = {"text_model." + k: v for k, v in _hf_state(_hf_model(SMALL, "gelu", seed=4)).items()}
    hf_sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    hf_sd["text_projection.weight"] = torch.randn(96, 128)  # CLIPTextModelWithProjection: [P, W]
    ldm = openclip_diffusers_to_ldm(hf_sd)
    assert set(ldm) == _ldm_sd2_keys(3, projection=True, logit_scale=False)
    assert torch.equal(ldm["text_projection"], hf_sd["text_projection.weight"].T)
    back = openclip_ldm_to_diffusers(ldm)
    del hf_sd["text_model.embeddings.position_ids"]
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key
    with pytest.raises(ValueError, match="logit_scale"):
        openclip_ldm_to_diffusers({**ldm, "logit_scale": torch.zeros(())})


def test_openclip_map_rejects_unknown_and_incomplete():
    hf_sd = _hf_state(_hf_model(SMALL, "gelu", seed=5))
    with pytest.raises(ValueError, match="vision_model"):
        openclip_diffusers_to_ldm({**hf_sd, "vision_model.post_layernorm.weight": torch.zeros(1)})
    partial = {k: v for k, v in hf_sd.items() if k != "encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match="layers.1"):
        openclip_diffusers_to_ldm(partial)


# ---- parity with transformers (small configs: the same code paths as the real sizes) ------------

@pytest.mark.parametrize("length", [16, 7])
def test_sd1_parity_small(length):
    hf = _hf_model(SMALL, "quick_gelu", seed=10)
    ldm = clip_diffusers_to_ldm(_hf_state(hf))
    ours = _load(CLIPTextModel, CLIPTextConfig.detect_from_weights(ldm), ldm)
    ids = _ids(SMALL["vocab_size"], 2, length, seed=11)
    got = _ours(ours, ids, (1, 2, 3))
    for k, (hf32, ref64) in _hf_runs(hf, ids, (1, 2, 3)).items():
        _assert_close(got[k], hf32, ref64)


def test_sd2_parity_small_diffusers_layout():
    hf = _hf_model(SMALL, "gelu", seed=12)
    ldm = openclip_diffusers_to_ldm(_hf_state(hf))
    ours = _load(OpenCLIPTextModel, OpenCLIPTextConfig.detect_from_weights(ldm, skip_last_layers=0), ldm)
    ids = _ids(SMALL["vocab_size"], 2, 16, seed=13)
    got = _ours(ours, ids, (1, 2, 3))
    for k, (hf32, ref64) in _hf_runs(hf, ids, (1, 2, 3)).items():
        _assert_close(got[k], hf32, ref64)


def test_sd2_parity_small_native_penultimate():
    """Native LDM layout: one more block than the HF model, skipped by skip_last_layers=1."""
    hf = _hf_model(SMALL, "gelu", seed=14)
    native = _native_openclip(_hf_state(hf), seed=15, projection_dim=96)
    cfg = OpenCLIPTextConfig.detect_from_weights(native)
    assert (cfg.layers, cfg.skip_last_layers, cfg.projection_dim, cfg.logit_scale) == (4, 1, 96, True)
    ours = _load(OpenCLIPTextModel, cfg, native)
    ids = _ids(SMALL["vocab_size"], 2, 16, seed=16)
    got = _ours(ours, ids, (1, 3))
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=4)  # only 3 blocks are ever run
    with torch.no_grad():
        all_blocks = _load(OpenCLIPTextModel, OpenCLIPTextConfig.detect_from_weights(
            native, skip_last_layers=0), native)(ids)
    runs = _hf_runs(hf, ids, (1, 3))
    for k, (hf32, ref64) in runs.items():
        _assert_close(got[k], hf32, ref64)
    assert (all_blocks.double() - runs[1][1]).abs().max() > 1e-2  # the extra block does matter


def test_inputs_embeds_replace_token_lookup():
    """Our output for given embeddings e equals transformers' for ids whose embedding rows are e."""
    hf = _hf_model(SMALL, "quick_gelu", seed=17)
    ldm = clip_diffusers_to_ldm(_hf_state(hf))
    ours = _load(CLIPTextModel, CLIPTextConfig.detect_from_weights(ldm), ldm)
    ids = torch.randperm(SMALL["vocab_size"], generator=torch.Generator().manual_seed(18))[:10][None]
    embeds = torch.randn(1, 10, 128, generator=torch.Generator().manual_seed(19)) * 0.1
    with torch.no_grad():
        got = ours(None, clip_skip=2, inputs_embeds=embeds)
        same = ours(inputs_embeds=ours.token_embedding(ids))
        assert torch.equal(same, ours(ids))
        hf.embeddings.token_embedding.weight[ids[0]] = embeds[0]  # ours shared it; done with ours
    hf32, ref64 = _hf_runs(hf, ids, (2,))[2]
    _assert_close(got, hf32, ref64)


@pytest.mark.parametrize("model_cls,cfg", [
    (CLIPTextModel, CLIPTextConfig(vocab_size=50, width=64, layers=2, heads=1, positions=8,
                                   mlp_width=128)),
    (OpenCLIPTextModel, OpenCLIPTextConfig(vocab_size=50, width=64, layers=3, heads=1, positions=8,
                                           mlp_width=128, skip_last_layers=1))])
def test_forward_argument_errors(model_cls, cfg):
    torch.manual_seed(20)
    model = model_cls(cfg).eval()
    ids = torch.randint(0, 50, (1, 8))
    assert model(ids, clip_skip=2).shape == (1, 8, 64)  # 2 blocks run in both
    for bad in (0, 3):
        with pytest.raises(ValueError, match="clip_skip"):
            model(ids, clip_skip=bad)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.randint(0, 50, (1, 9)))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=torch.zeros(1, 8, 64))
    with pytest.raises(ValueError, match="exactly one"):
        model(None)
    with pytest.raises(ValueError, match="B, T"):
        model(ids[0])


# ---- real SD1.5 / SD2.1 shapes ----------------------------------------------------------------

@pytest.mark.slow
def test_sd1_parity_real_size():
    hf = _hf_model(SD1, "quick_gelu", seed=30)
    ldm = clip_diffusers_to_ldm(_hf_state(hf))
    assert set(ldm) == _ldm_sd1_keys(12)
    ours = _load(CLIPTextModel, CLIPTextConfig.detect_from_weights(ldm), ldm)
    assert ours.config == CLIPTextConfig()
    ids = _ids(SD1["vocab_size"], 2, 77, seed=31)
    got = _ours(ours, ids, (1, 2))
    del ours, ldm
    for k, (hf32, ref64) in _hf_runs(hf, ids, (1, 2)).items():
        _assert_close(got[k], hf32, ref64)


@pytest.mark.slow
def test_sd2_parity_real_size():
    """The diffusers SD2.1 text encoder (23 HF layers) vs ours from the key map (skip 0 of 23) and
    vs a native 24-block LDM tower (skip_last_layers=1); diffusers' converter agrees on names."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    hf = _hf_model(SD2_DIFFUSERS, "gelu", seed=32)
    hf_sd = _hf_state(hf)
    native = _native_openclip(hf_sd, seed=33, projection_dim=1024)
    assert set(native) == _ldm_sd2_keys(24)
    prefixed = {"cond_stage_model.model." + k: v for k, v in native.items()}
    back = convert_open_clip_checkpoint(hf, prefixed)
    assert set(back) == {"text_model." + k for k in hf_sd}
    assert all(torch.equal(back["text_model." + k], v) for k, v in hf_sd.items())
    del back, prefixed
    ldm = openclip_diffusers_to_ldm(hf_sd)
    converted_cfg = OpenCLIPTextConfig.detect_from_weights(ldm, skip_last_layers=0)
    assert (converted_cfg.layers, converted_cfg.projection_dim, converted_cfg.logit_scale) == (23, None, False)
    converted = _load(OpenCLIPTextModel, converted_cfg, ldm)
    native_model = _load(OpenCLIPTextModel, OpenCLIPTextConfig.detect_from_weights(native), native)
    assert native_model.config == OpenCLIPTextConfig()
    ids = _ids(SD2_DIFFUSERS["vocab_size"], 2, 77, seed=34)
    got_converted, got_native = _ours(converted, ids, (1, 2)), _ours(native_model, ids, (1, 2))
    del converted, native_model, native, ldm, hf_sd
    for k, (hf32, ref64) in _hf_runs(hf, ids, (1, 2)).items():
        _assert_close(got_converted[k], hf32, ref64)
        _assert_close(got_native[k], hf32, ref64)
