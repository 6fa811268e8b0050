"""LoRA at inference: file formats against diffusers' own loader, exact hot-swap, prompt tags.

Parity: a random kohya LoRA over every transformer-block linear, proj_in/proj_out, one 3x3
conv (LoCon) and every text-encoder layer is loaded by sdfast (merged into the weights) and by
diffusers' `load_lora_weights` (PEFT layers, unmerged) on the same random SD1 and SD2 models;
UNet and text-encoder outputs must agree to fp32 rounding (a wrong key map or scale moves them
by the LoRA's whole effect, thousands of times the tolerance, which the test also checks).
"""
import warnings

import pytest
import torch
from safetensors.torch import save_file

import sdfast
from _pipelines import family_of, make_reference, save_single_file
from sdfast.addons.tags import extract_lora_tags, parse_tag
from sdfast.errors import SdfastError

RANK = 4


def _diffusers_modules(module, prefix, keep):
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and keep(name)]


def random_kohya_lora(ref, seed=0, rank=RANK, alpha=2.0, te=True, conv=True, scale=0.3,
                      convs=("down_blocks.0.resnets.0.conv1",)):
    """A kohya-format LoRA for the diffusers pipeline `ref` (names from its modules): every
    transformer-block linear and proj_in/proj_out, the 3x3 `convs` (LoCon) when `conv`, and
    every text-encoder layer when `te`."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def add(kohya, m):
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, m.in_features, generator=gen)
            up = torch.randn(m.out_features, rank, generator=gen)
        fan = down[0].numel()
        sd[f"{kohya}.lora_down.weight"] = down * fan ** -0.5
        sd[f"{kohya}.lora_up.weight"] = up * scale
        sd[f"{kohya}.alpha"] = torch.tensor(alpha)

    for name, m in _diffusers_modules(ref.unet, "", lambda n: ".attentions." in n):
        add("lora_unet_" + name.replace(".", "_"), m)
    if conv:
        for path in convs:
            add("lora_unet_" + path.replace(".", "_"), ref.unet.get_submodule(path))
    if te:
        for name, m in _diffusers_modules(ref.text_encoder, "", lambda n: ".layers." in n):
            if not name.startswith("text_model."):      # transformers 5 drops the prefix;
                name = "text_model." + name              # kohya files always carry it
            add("lora_te_" + name.replace(".", "_"), m)
    return sd


@pytest.fixture(scope="module", params=["small_sd1", "small_sd2"])
def model(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    ref = make_reference(kind, tmp)
    single = save_single_file(ref, family_of(kind), tmp / "model.safetensors")
    return kind, ref, single, tmp


def _inputs(ref, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = ref.unet.config.cross_attention_dim
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, ctx_dim, generator=gen)
    ids = torch.randint(1, 49000, (2, 77), generator=gen)
    return x, torch.tensor([500.0, 20.0]), ctx, ids


def _outputs_ref(ref, x, t, ctx, ids):
    with torch.no_grad():
        return (ref.unet(x, t, encoder_hidden_states=ctx).sample,
                ref.text_encoder(ids)[0])


def _outputs(pipe, x, t, ctx, ids):
    with torch.no_grad():
        return pipe.unet(x, t, ctx), pipe.text_encoder(ids)


def test_kohya_lora_matches_diffusers_load_lora_weights(model, tmp_path):
    kind, ref, single, _ = model
    lora = random_kohya_lora(ref)
    path = tmp_path / "style.safetensors"
    save_file(lora, str(path))
    inputs = _inputs(ref)
    base_unet, base_text = _outputs_ref(ref, *inputs)

    pipe = sdfast.load(single)
    name = pipe.load_lora(path, strength=0.7)
    assert name == "style" and pipe.loras["style"]["strength"] == 0.7
    assert pipe.loras["style"]["modules"] == len([k for k in lora if k.endswith(".alpha")])
    unet_out, text_out = _outputs(pipe, *inputs)

    ref.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="style")
    ref.set_adapters(["style"], adapter_weights=[0.7])
    try:
        ref_unet, ref_text = _outputs_ref(ref, *inputs)
    finally:
        ref.unload_lora_weights()
    effect_unet = (ref_unet - base_unet).abs().max().item()
    effect_text = (ref_text - base_text).abs().max().item()
    err_unet = (unet_out - ref_unet).abs().max().item()
    err_text = (text_out - ref_text).abs().max().item()
    assert effect_unet > 1e-2 and effect_text > 1e-2, (effect_unet, effect_text)
    # fp32 rounding of a merged vs an unmerged LoRA: a few ulps of the outputs' size.
    assert err_unet < 2e-5 * max(1.0, ref_unet.abs().max().item()), (err_unet, effect_unet)
    assert err_text < 2e-5 * max(1.0, ref_text.abs().max().item()), (err_text, effect_text)


def _as_peft(lora):
    """The same LoRA in diffusers/PEFT names (scale folded into up: PEFT files carry no alpha)."""
    out = {}
    for key, value in lora.items():
        module, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        down = lora[f"{module}.lora_down.weight"]
        scale = lora[f"{module}.alpha"].item() / down.shape[0]
        if module.startswith("lora_unet_"):
            name = "unet." + _dotted(module[len("lora_unet_"):], UNET_WORDS)
        else:
            name = "text_encoder." + _dotted(module[len("lora_te_"):], TEXT_WORDS)
        if suffix == "lora_down.weight":
            out[f"{name}.lora_A.weight"] = value
        else:
            out[f"{name}.lora_B.weight"] = value * scale
    return out


UNET_WORDS = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in",
              "proj_out", "to_q", "to_k", "to_v", "to_out", "ff", "net", "attn1", "attn2",
              "attentions", "resnets", "conv1", "proj"]
TEXT_WORDS = ["text_model", "encoder", "layers", "self_attn", "q_proj", "k_proj", "v_proj",
              "out_proj", "mlp", "fc1", "fc2"]


def _dotted(kohya, words):
    """Undo kohya's `.` -> `_` using the known multi-word names."""
    out, rest = [], kohya
    while rest:
        for word in sorted(words, key=len, reverse=True):
            if rest.startswith(word) and (len(rest) == len(word) or rest[len(word)] == "_"):
                out.append(word)
                rest = rest[len(word) + 1:]
                break
        else:
            head, _, rest = rest.partition("_")
            out.append(head)
    return ".".join(out)


def _weights(pipe):
    return {f"{c}.{n}": p.detach().clone() for c, m in (("unet", pipe.unet), ("te", pipe.text_encoder))
            for n, p in m.named_parameters()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_peft_and_old_diffusers_names_merge_like_kohya(model, tmp_path):
    kind, ref, single, _ = model
    lora = random_kohya_lora(ref, conv=False)
    pipe = sdfast.load(single)
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    pipe.load_lora(tmp_path / "kohya.safetensors")
    kohya = _weights(pipe)
    pipe.unload_lora("kohya")
    peft = _as_peft(lora)
    save_file(peft, str(tmp_path / "peft.safetensors"))
    pipe.load_lora(tmp_path / "peft.safetensors")
    merged = _weights(pipe)
    for key in kohya:
        torch.testing.assert_close(merged[key], kohya[key], rtol=0, atol=1e-6)
    pipe.unload_lora("peft")
    old = {}
    for key, value in peft.items():               # diffusers < 0.24 attention-processor names
        if key.startswith("unet.") and ".attn" in key and ".to_" in key:
            module, _, tail = key.rpartition(".lora_")
            head, _, proj = module.rpartition(".")
            if proj == "0":
                head, _, proj = head.rpartition(".")
            part = "down" if tail.startswith("A") else "up"
            old[f"{head}.processor.{proj}_lora.{part}.weight"] = value
    save_file(old, str(tmp_path / "old.safetensors"))
    pipe.load_lora(tmp_path / "old.safetensors")
    merged = _weights(pipe)
    attn = [k for k in kohya if ".attn" in k and k.startswith("unet.") and "transformer_blocks" in k
            and k.endswith(".weight") and "norm" not in k]
    assert attn
    for key in attn:
        torch.testing.assert_close(merged[key], kohya[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unload_and_swaps_are_bit_exact(model, tmp_path, dtype):
    kind, ref, single, _ = model
    save_file(random_kohya_lora(ref, seed=1), str(tmp_path / "a.safetensors"))
    save_file(random_kohya_lora(ref, seed=2, conv=False), str(tmp_path / "b.safetensors"))
    pipe = sdfast.load(single, dtype=dtype)
    original = _weights(pipe)
    pipe.load_lora(tmp_path / "a.safetensors")
    with_a = _weights(pipe)
    assert any(not torch.equal(with_a[k], original[k]) for k in original)
    pipe.unload_lora("a")
    _assert_same(_weights(pipe), original)
    pipe.load_lora(tmp_path / "b.safetensors", strength=0.5)
    pipe.unload_lora("b")
    pipe.load_lora(tmp_path / "a.safetensors")
    _assert_same(_weights(pipe), with_a)                      # A, B, A again: A's weights
    pipe.set_lora_strength("a", 0.25, strength_clip=2.0)
    pipe.set_lora_strength("a", 1.0)
    _assert_same(_weights(pipe), with_a)                      # strength changes are exact
    pipe.load_lora(tmp_path / "b.safetensors", strength=0.5)
    assert set(pipe.loras) == {"a", "b"}
    pipe.unload_lora("a")
    pipe.unload_lora("b")
    _assert_same(_weights(pipe), original)
    assert pipe.loras == {}


def test_a_swap_reuses_the_unloaded_copies_and_the_spares_are_freed(model, tmp_path):
    kind, ref, single, _ = model
    save_file(random_kohya_lora(ref, seed=1), str(tmp_path / "a.safetensors"))
    save_file(random_kohya_lora(ref, seed=2, conv=False), str(tmp_path / "b.safetensors"))
    fresh = sdfast.load(single)
    fresh.load_lora(tmp_path / "b.safetensors", strength=0.7)
    with_b = _weights(fresh)
    pipe = sdfast.load(single)
    name, weight = _one_linear(pipe)
    pipe.load_lora(tmp_path / "a.safetensors")
    copy_ptr = pipe.unet.get_parameter(name).data_ptr()
    pipe.unload_lora("a")
    assert pipe.unet.get_parameter(name).data_ptr() != copy_ptr        # the original is back
    spares = pipe._lora_stack._spares
    assert spares[("unet", name)].data_ptr() == copy_ptr              # kept, not freed
    assert any(k[0] == "unet" and pipe.unet.get_parameter(k[1]).dim() == 4 for k in spares)
    pipe.load_lora(tmp_path / "b.safetensors", strength=0.7)
    # the spare was alive while b merged, so an equal address means b merged into it
    assert pipe.unet.get_parameter(name).data_ptr() == copy_ptr
    _assert_same(_weights(pipe), with_b)                               # as a first load gives
    assert spares == {}                         # those b did not take (a's LoCon conv): freed
    pipe.unload_lora("b")
    assert spares
    pipe.release_lora_buffers()
    assert spares == {}
    pipe.load_lora(tmp_path / "b.safetensors", strength=0.7)
    pipe.unload_lora("b")
    pipe.generate("a cat", width=64, height=64, steps=1, output="tensor", progress=False)
    assert spares == {}                         # a generate frees what no load took


def test_strengths_scale_unet_and_text_encoder_separately(model, tmp_path):
    kind, ref, single, _ = model
    save_file(random_kohya_lora(ref), str(tmp_path / "a.safetensors"))
    pipe = sdfast.load(single)
    original = _weights(pipe)
    pipe.load_lora(tmp_path / "a.safetensors", strength=1.0, strength_clip=0.0)
    after = _weights(pipe)
    te_changed = [k for k in original if k.startswith("te.") and not torch.equal(after[k], original[k])]
    unet_changed = [k for k in original if k.startswith("unet.") and not torch.equal(after[k], original[k])]
    assert not te_changed and unet_changed
    pipe.set_lora_strength("a", 0.0, strength_clip=1.0)
    after = _weights(pipe)
    assert all(torch.equal(after[k], original[k]) for k in original if k.startswith("unet."))
    assert any(not torch.equal(after[k], original[k]) for k in original if k.startswith("te."))


def _one_linear(pipe):
    name = next(n for n, p in pipe.unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    return name, pipe.unet.get_parameter(name)


def test_loha_and_lokr_merge_their_products(model, tmp_path):
    kind, ref, single, _ = model
    pipe = sdfast.load(single)
    name, weight = _one_linear(pipe)
    original = weight.detach().clone()
    kohya = "lora_unet_" + name[: -len(".weight")].replace(".", "_")     # LDM-style kohya name
    o, i = weight.shape
    gen = torch.Generator().manual_seed(3)
    r = 2
    loha = {f"{kohya}.hada_w1_a": torch.randn(o, r, generator=gen), f"{kohya}.hada_w1_b": torch.randn(r, i, generator=gen),
            f"{kohya}.hada_w2_a": torch.randn(o, r, generator=gen), f"{kohya}.hada_w2_b": torch.randn(r, i, generator=gen),
            f"{kohya}.alpha": torch.tensor(1.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    pipe.load_lora(tmp_path / "loha.safetensors", strength=0.5)
    expected = original + 0.5 * (1.0 / r) * ((loha[f"{kohya}.hada_w1_a"] @ loha[f"{kohya}.hada_w1_b"])
                                            * (loha[f"{kohya}.hada_w2_a"] @ loha[f"{kohya}.hada_w2_b"]))
    torch.testing.assert_close(pipe.unet.get_parameter(name), expected, rtol=1e-6, atol=1e-6)
    pipe.unload_lora("loha")
    assert torch.equal(pipe.unet.get_parameter(name), original)

    f = 4 if o % 4 == 0 and i % 4 == 0 else 1
    lokr = {f"{kohya}.lokr_w1": torch.randn(f, f, generator=gen),
            f"{kohya}.lokr_w2_a": torch.randn(o // f, r, generator=gen),
            f"{kohya}.lokr_w2_b": torch.randn(r, i // f, generator=gen),
            f"{kohya}.alpha": torch.tensor(4.0)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    pipe.load_lora(tmp_path / "lokr.safetensors")
    w2 = lokr[f"{kohya}.lokr_w2_a"] @ lokr[f"{kohya}.lokr_w2_b"]
    expected = original + (4.0 / r) * torch.kron(lokr[f"{kohya}.lokr_w1"], w2)
    torch.testing.assert_close(pipe.unet.get_parameter(name), expected, rtol=1e-6, atol=1e-6)


def test_unmatched_keys_warn_and_fail_when_strict(model, tmp_path):
    kind, ref, single, _ = model
    lora = random_kohya_lora(ref, te=False, conv=False)
    lora["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(RANK, 8)
    lora["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, RANK)
    save_file(lora, str(tmp_path / "extra.safetensors"))
    pipe = sdfast.load(single)
    with pytest.warns(UserWarning, match=r"1 LoRA key\(s\) match no layer .*lora_unet_no_such_layer"):
        pipe.load_lora(tmp_path / "extra.safetensors")
    pipe.unload_lora("extra")
    with pytest.raises(SdfastError, match="match no layer"):
        pipe.load_lora(tmp_path / "extra.safetensors", strict=True)
    assert pipe.loras == {}


def test_wrong_family_loras_are_errors_that_say_so(model, tmp_path):
    kind, ref, single, _ = model
    pipe = sdfast.load(single)
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    save_file(sdxl, str(tmp_path / "xl.safetensors"))
    with pytest.raises(SdfastError, match="SDXL"):
        pipe.load_lora(tmp_path / "xl.safetensors")
    # a LoRA whose cross-attention keys read another text width (SD2's 1024 on SD1, or 768 on SD2)
    lora = random_kohya_lora(ref, te=False, conv=False)
    key = next(k for k in lora if "attn2_to_k" in k and k.endswith("lora_down.weight"))
    lora[key] = torch.zeros(RANK, 1024 if kind == "small_sd1" else 768)
    save_file(lora, str(tmp_path / "other.safetensors"))
    with pytest.raises(SdfastError, match="another text-encoder width"):
        pipe.load_lora(tmp_path / "other.safetensors")
    assert pipe.loras == {}
    with pytest.raises(SdfastError, match="no such LoRA file"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(SdfastError, match="no LoRA tensors"):
        pipe.load_lora(tmp_path / "notlora.safetensors")


def test_prompt_tag_syntax():
    assert parse_tag("style") == parse_tag("style:1")
    tag = parse_tag("style:0.8")
    assert (tag.name, tag.te, tag.unet) == ("style", 0.8, 0.8)
    tag = parse_tag("style:0.5:1")
    assert (tag.te, tag.unet) == (0.5, 1.0)
    tag = parse_tag("style:te=0.5:unet=1")
    assert (tag.te, tag.unet) == (0.5, 1.0)
    tag = parse_tag("style:unet=0.3")
    assert (tag.te, tag.unet) == (1.0, 0.3)
    text, tags = extract_lora_tags("a cat <lora:style:0.8>, <LYCO:b:te=0:unet=2> on a mat")
    assert text == "a cat ,  on a mat"                 # only the tags go, as in A1111
    assert [(t.name, t.te, t.unet) for t in tags] == [("style", 0.8, 0.8), ("b", 0.0, 2.0)]
    for bad in ("style:x", ":1", "style:foo=1"):
        with pytest.raises(SdfastError):
            parse_tag(bad)


def test_prompt_tags_equal_loading_the_lora_and_leave_nothing_behind(model, tmp_path):
    kind, ref, single, _ = model
    folder = tmp_path / "loras" / "sub"
    folder.mkdir(parents=True)
    save_file(random_kohya_lora(ref, seed=5), str(folder / "style.safetensors"))
    pipe = sdfast.load(single)
    original = _weights(pipe)
    kw = dict(width=64, height=64, steps=2, seed=[1, 2], output="tensor", progress=False)
    tagged = pipe.generate(["a cat <lora:style:0.6:0.9>"] * 2, lora_dir=tmp_path / "loras", **kw)
    _assert_same(_weights(pipe), original)                          # gone after the call
    assert pipe.loras == {}
    pipe.load_lora(folder / "style.safetensors", strength=0.9, strength_clip=0.6)
    loaded = pipe.generate(["a cat "] * 2, **kw)
    plain_prompt = pipe.generate(["a cat"] * 2, **kw)
    pipe.unload_lora("style")
    untouched = pipe.generate(["a cat "] * 2, **kw)
    assert torch.equal(tagged, loaded)
    assert not torch.allclose(tagged, untouched, atol=1e-3)
    assert plain_prompt.shape == tagged.shape
    with pytest.raises(SdfastError, match="unknown LoRA 'nope'"):
        pipe.generate("a <lora:nope>", lora_dir=tmp_path / "loras", **{**kw, "seed": 1})
    with pytest.raises(SdfastError, match="no LoRA folder"):
        pipe.generate("a <lora:style>", **{**kw, "seed": 1})
    with pytest.raises(SdfastError, match="same <lora"):
        pipe.generate(["a <lora:style>", "b"], lora_dir=tmp_path / "loras", **kw)
    _assert_same(_weights(pipe), original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.lora_dir = tmp_path / "loras"
        pipe.generate("a <lora:style>", **{**kw, "seed": 1})


def test_cli_lora_flags(model, tmp_path):
    from PIL import Image

    from test_cli import assert_one_line_error, run_cli

    kind, ref, single, _ = model
    if kind != "small_sd1":
        pytest.skip("one family is enough for the flags")
    save_file(random_kohya_lora(ref, seed=7), str(tmp_path / "style.safetensors"))
    common = ["generate", "--model", str(single), "--steps", "1", "-W", "64", "-H", "64", "--quiet"]
    outs = {}
    for label, extra in (("none", []), ("flag", ["--lora", f"{tmp_path / 'style.safetensors'}:0.8"]),
                         ("tag", ["--lora-dir", str(tmp_path)])):
        prompt = "a cat <lora:style:0.8>" if label == "tag" else "a cat "
        out = tmp_path / f"{label}.png"
        rc, _, err = run_cli(*common, "--prompt", prompt, "-o", str(out), *extra)
        assert rc == 0, err
        with Image.open(out) as img:
            outs[label] = img.tobytes()
    assert outs["flag"] == outs["tag"] != outs["none"]
    rc, _, err = run_cli(*common, "--prompt", "x", "--lora", str(tmp_path / "nope.safetensors:0.5"))
    assert_one_line_error(rc, err, "no such LoRA file")
    rc, _, err = run_cli(*common, "--prompt", "x <lora:nope>", "--lora-dir", str(tmp_path))
    assert_one_line_error(rc, err, "unknown LoRA 'nope'")


def test_lora_merge_command_bakes_loras_and_never_overwrites(model, tmp_path):
    from test_cli import assert_one_line_error, run_cli

    kind, ref, single, _ = model
    if kind != "small_sd2":
        pytest.skip("one family is enough for the command (SD2 has the fused q/k/v case)")
    save_file(random_kohya_lora(ref, seed=8), str(tmp_path / "a.safetensors"))
    save_file(random_kohya_lora(ref, seed=9, conv=False), str(tmp_path / "b.safetensors"))
    out = tmp_path / "merged.safetensors"
    rc, stdout, err = run_cli("lora", "merge", str(single), f"{tmp_path / 'a.safetensors'}:0.7",
                              f"{tmp_path / 'b.safetensors'}:0.5:1.5", "-o", str(out))
    assert rc == 0, err
    pipe = sdfast.load(single)
    pipe.load_lora(tmp_path / "a.safetensors", 0.7)
    pipe.load_lora(tmp_path / "b.safetensors", 0.5, 1.5)
    merged = sdfast.load(out)
    assert merged.info["family"] == pipe.info["family"]
    _assert_same(_weights(merged), _weights(pipe))
    first = out.read_bytes()
    rc, _, err = run_cli("lora", "merge", str(single), str(tmp_path / "a.safetensors"), "-o", str(out))
    assert_one_line_error(rc, err, "exists")
    assert out.read_bytes() == first


# ----------------------------------------------------------------------------- real SD1.5 shapes
SD15_CONVS = ("down_blocks.0.resnets.0.conv1", "down_blocks.3.resnets.1.conv2",
              "mid_block.resnets.0.conv1", "up_blocks.1.resnets.2.conv1", "up_blocks.3.resnets.0.conv2")


def _lora_modules(lora):
    """`[(component, diffusers module path, up, down, scale)]` of a kohya or PEFT file."""
    out = []
    for key, down in lora.items():
        if key.endswith(".lora_down.weight"):                               # kohya
            module = key[: -len(".lora_down.weight")]
            up, alpha = lora[f"{module}.lora_up.weight"], lora[f"{module}.alpha"].item()
            if module.startswith("lora_unet_"):
                out.append(("unet", _dotted(module[len("lora_unet_"):], UNET_WORDS), up, down,
                            alpha / down.shape[0]))
            else:
                out.append(("text_encoder", _dotted(module[len("lora_te_"):], TEXT_WORDS), up,
                            down, alpha / down.shape[0]))
        elif key.endswith(".lora_A.weight"):                                 # PEFT: no alpha
            module = key[: -len(".lora_A.weight")]
            component, _, path = module.partition(".")
            out.append((component, path, lora[f"{module}.lora_B.weight"], down, 1.0))
    return out


def _diffusers_weight(model, path):
    """The weight tensor of a diffusers/transformers module path (transformers 5 drops
    CLIPTextModel's `text_model.` prefix; kohya and PEFT names keep it)."""
    params = dict(model.named_parameters())
    key = f"{path}.weight"
    return params[key] if key in params else params[key[len("text_model."):]]


def _ldm_key(component, path, ref):
    from sdfast.io.detect import CLIP_PREFIX, UNET_PREFIX
    from sdfast.io.diffusers_clip import clip_diffusers_to_ldm
    from sdfast.io.diffusers_unet import unet_diffusers_to_ldm

    one = {f"{path}.weight": torch.zeros(())}
    if component == "unet":
        return UNET_PREFIX + next(iter(unet_diffusers_to_ldm(one, dict(ref.unet.config))))
    return CLIP_PREFIX + next(iter(clip_diffusers_to_ldm(one)))


def _merge_errors(lora, strength, ref, ours, original):
    """Per module: `(max|ours - exact|, max|theirs - exact|, max|exact|, max|delta|)`, where
    `exact` is the float64 merge of the file's factors into the original weight, `ours` sdfast's
    merged weights (LDM keys), `theirs` diffusers' fused weights (read from `ref`)."""
    errors = {}
    for component, path, up, down, scale in _lora_modules(lora):
        key = _ldm_key(component, path, ref)
        theirs = _diffusers_weight(getattr(ref, component), path).detach()
        w = original[key].double()
        delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
        exact = w + strength * scale * delta
        errors[key] = ((ours[key].double() - exact).abs().max().item(),
                       (theirs.double().reshape(w.shape) - exact).abs().max().item(),
                       exact.abs().max().item(), (strength * scale * delta).abs().max().item())
    return errors


@pytest.mark.slow
def test_real_sd15_shapes_kohya_and_peft_loras_match_diffusers_fuse_lora(tmp_path):
    """Issue 6 at SD1.5 shapes: a kohya file (every transformer-block linear and proj, five 3x3
    convs across the levels, every text-encoder layer; random up/down/alpha) and the same LoRA
    as a PEFT file, merged by sdfast's `load_lora` and fused by diffusers' `load_lora_weights` +
    `fuse_lora`, at strength 0.7. Tolerance earned per weight: against the float64 merge, ours
    may be at most twice as far as diffusers' own fp32 merge, plus 4 ulps of the weight."""
    from safetensors import safe_open

    from sdfast.io.save import ldm_state_dict

    ref = make_reference("sd15", tmp_path)
    single = save_single_file(ref, "sd1", tmp_path / "model.safetensors")
    kohya = random_kohya_lora(ref, seed=21, rank=8, alpha=4.0, scale=0.05, convs=SD15_CONVS)
    strength = 0.7
    inputs = _inputs(ref)
    handle = safe_open(str(single), "pt")
    original = {k: handle.get_tensor(k) for k in handle.keys()}             # mmapped, LDM keys
    pipe = sdfast.load(single)
    base_unet, base_text = _outputs(pipe, *inputs)
    eps32 = torch.finfo(torch.float32).eps
    for name, lora in (("kohya", kohya), ("peft", _as_peft(kohya))):
        path = tmp_path / f"{name}.safetensors"
        save_file(lora, str(path))
        pipe.load_lora(path, strength=strength, strict=True)
        assert pipe.loras[name]["modules"] == len(_lora_modules(lora))
        ours = ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, "sd1")
        ours_out = _outputs(pipe, *inputs)
        ref.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name=name)
        ref.fuse_lora(lora_scale=strength, adapter_names=[name])
        theirs_out = _outputs_ref(ref, *inputs)
        ref.unload_lora_weights()                        # keeps the fused weights
        errors = _merge_errors(lora, strength, ref, ours, original)
        # 16 transformer blocks x (10 linears + proj_in/out), 5 convs, 12 text layers x 6
        assert len(errors) == len(_lora_modules(lora)) == 16 * 12 + 5 + 12 * 6
        for key, (err, ref_err, size, delta) in errors.items():
            assert ref_err < 1e-3 * delta, (key, ref_err, delta)         # diffusers did merge it
            assert err <= 2 * ref_err + 4 * eps32 * size, (name, key, err, ref_err)
        untouched = [k for k in ours if k not in errors]
        assert all(torch.equal(ours[k], original[k]) for k in untouched)
        for out, theirs, base in zip(ours_out, theirs_out, (base_unet, base_text)):
            tol = 1e-4 * max(1.0, theirs.abs().max().item())   # as the real-shape generate test
            assert (out - theirs).abs().max().item() < tol
            assert (out - base).abs().max().item() > 100 * tol            # the LoRA matters
        pipe.unload_lora(name)
        with torch.no_grad():                            # diffusers' original weights back
            for component, path_, *_ in _lora_modules(lora):
                weight = _diffusers_weight(getattr(ref, component), path_)
                weight.copy_(original[_ldm_key(component, path_, ref)].reshape(weight.shape))
