"""`sdfast train lora | textual-inversion | dreambooth | controlnet` end to end on small models:
each method's loss falls on a tiny dataset it can overfit, only what it trains changes, its
files load in sdfast (and LoRA / embeddings in diffusers), resume repeats an uninterrupted run,
an interrupted save keeps the previous file, and bad input is one line from the CLI."""
import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sdfast
import sdfast.io.load
import sdfast.train.objectives
from _train_fixtures import (fixed_loss, interrupt_at, one_thread,  # noqa: F401
                             tiny_models)
from sdfast.addons.embeddings import read_embedding
from sdfast.addons.preprocess import canny
from sdfast.data.shapes import ShapeSpec, render, write_dataset
from sdfast.errors import SdfastError
from sdfast.io.load import load_components
from sdfast.io.save import save_checkpoint
from sdfast.text import get_tokenizer
from sdfast.train import (train_controlnet, train_dreambooth, train_lora,
                          train_textual_inversion)
from sdfast.train.cli import main as train_main
from sdfast.train.config import load_dataset_config
from sdfast.train.controlnet import init_controlnet
from sdfast.train.dataset import TrainData, load_image
from sdfast.train.dreambooth import CLASS_PREFIX, class_image_seed
from sdfast.train.textual_inversion import initial_vectors, place_vectors
from sdfast.train.textual_inversion import _lookup as ti_lookup

BUILTIN = sdfast.__path__[0] + "/builtin/sdfast-shapes.safetensors"
TOKEN = "<zq-thing>"


def toml(path, body, resolution=64, batch_size=4):
    path.write_text(f"[[datasets]]\nresolution = {resolution}\nbatch_size = {batch_size}\n{body}")
    return path


def subset(image_dir, **fields):
    lines = [f'image_dir = "{image_dir}"'] + [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return "[[datasets.subsets]]\n" + "\n".join(lines) + "\n"


def concept_images(folder, n, caption, spec=ShapeSpec("circle", "red", "middle center", "large",
                                                      "blue"), seed=0):
    """`n` jittered renders of one shape spec, each captioned `caption`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        render(spec, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    save_checkpoint(root / "tiny.safetensors", *tiny_models(), "sd1")
    write_dataset(root / "data", 16, seed=0)
    toml(root / "data.toml", subset(root / "data" / "images", caption_extension=".txt"))
    for p in sorted((root / "data" / "images").glob("*.png")):
        (root / "cond").mkdir(exist_ok=True)
        canny(p).save(root / "cond" / p.name)
    toml(root / "control.toml", subset(root / "data" / "images", conditioning_data_dir=str(
        root / "cond")))
    concept_images(root / "concept", 4, f"a photo of {TOKEN}")
    toml(root / "ti.toml", subset(root / "concept"))
    return root


def images_and_captions(folder, n=8, size=(64, 64)):
    paths = sorted(folder.glob("*.png"))[:n]
    return (torch.stack([load_image(p, size) for p in paths]),
            [p.with_suffix(".txt").read_text().strip() for p in paths], paths)


def ids_of(captions):
    return {"input_ids": get_tokenizer()(captions)}


def capture_parts(monkeypatch):
    """Keep the models a training run loads (to check afterwards what it changed)."""
    seen = []
    real = sdfast.io.load.load_components

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(sdfast.io.load, "load_components", spy)
    return seen


def same_weights(module, path, component):
    fresh = getattr(load_components(path), component).state_dict()
    return all(torch.equal(v, fresh[k]) for k, v in module.state_dict().items())


FAST = dict(progress=False, cache_latents=True, seed=7)


# ---------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_run(base):
    return train_lora(base / "tiny.safetensors", base / "data.toml", base / "lora", "style",
                      max_train_steps=20, learning_rate=1e-2, network_dim=4, network_alpha=2,
                      conv_dim=2, conv_alpha=1, save_every_n_steps=10, **FAST)


def test_lora_loss_falls_and_the_file_loads(base, lora_run):
    images, captions, _ = images_and_captions(base / "data" / "images")
    pipe = sdfast.load(base / "tiny.safetensors", device="cpu")
    before = fixed_loss(pipe.unet, pipe.text_encoder, pipe.vae, images, ids_of(captions))
    pipe.load_lora(lora_run.output, strict=True)            # every key matches a layer
    after = fixed_loss(pipe.unet, pipe.text_encoder, pipe.vae, images, ids_of(captions))
    print(f"LoRA: per-step {lora_run.losses[0]:.3f} -> {lora_run.losses[-1]:.3f}, "
          f"fixed batch {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before


def test_lora_file_is_kohya_format(base, lora_run):
    sd = load_file(str(lora_run.output))
    with safe_open(str(lora_run.output), "pt") as f:
        meta = f.metadata()
    names = {k.split(".")[0] for k in sd}
    # transformer blocks (linear + 1x1 proj), the text encoder, and with conv_dim the res blocks
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in names
    conv = "lora_unet_up_blocks_1_resnets_0_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape[:1] + sd[f"{conv}.lora_down.weight"].shape[2:] \
        == (2, 3, 3) and float(sd[f"{conv}.alpha"]) == 1.0               # LoCon: conv rank
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{attn}.lora_down.weight"].shape == (4, 32) and float(sd[f"{attn}.alpha"]) == 2
    assert not any(n.startswith(("lora_unet_conv_in", "lora_unet_time_embedding")) for n in names)
    assert all(f"{n}.{s}" in sd for n in names for s in ("lora_up.weight", "lora_down.weight"))
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == \
        ("networks.lora", "4", "2")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert (meta["ss_base_model_version"], meta["ss_steps"], meta["ss_resolution"]) == \
        ("sd_v1", "20", "(64, 64)")
    tags = json.loads(meta["ss_tag_frequency"])["images"]
    captions = [p.read_text() for p in sorted((base / "data" / "images").glob("*.txt"))]
    first = captions[0].split(",")[0].strip().lower()
    assert tags[first] == sum(c.split(",")[0].strip().lower() == first for c in captions)
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 1, "img_count": 16}}
    step10 = base / "lora" / "style-step00000010.safetensors"
    with safe_open(str(step10), "pt") as f:
        assert f.metadata()["ss_steps"] == "10"


@pytest.mark.parametrize("kind", ["small_sd1", "small_sd2"])
def test_lora_loads_in_diffusers_like_in_sdfast(kind, tmp_path):
    from _pipelines import family_of, make_reference, save_single_file

    ref = make_reference(kind, tmp_path)
    single = save_single_file(ref, family_of(kind), tmp_path / "model.safetensors")
    write_dataset(tmp_path / "data", 8, seed=1)
    config = toml(tmp_path / "d.toml", subset(tmp_path / "data" / "images"))
    result = train_lora(single, config, tmp_path / "out", "style", max_train_steps=3,
                        learning_rate=5e-2, network_dim=4, network_alpha=2, conv_dim=2, **FAST)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500.0, 20.0])
    ctx = torch.randn(2, 77, ref.unet.config.cross_attention_dim, generator=gen)
    ids = torch.randint(1, 49000, (2, 77), generator=gen)
    with torch.no_grad():
        base_unet, base_text = ref.unet(x, t, encoder_hidden_states=ctx).sample, \
            ref.text_encoder(ids)[0]
        pipe = sdfast.load(single, device="cpu")
        pipe.load_lora(result.output, strict=True)
        ours_unet, ours_text = pipe.unet(x, t, ctx), pipe.text_encoder(ids)
        ref.load_lora_weights(str(result.output), adapter_name="style")
        theirs_unet, theirs_text = ref.unet(x, t, encoder_hidden_states=ctx).sample, \
            ref.text_encoder(ids)[0]
    effect = min((theirs_unet - base_unet).abs().max(), (theirs_text - base_text).abs().max())
    assert effect > 1e-2                     # the LoRA does something in diffusers too
    # merged (sdfast) vs unmerged (PEFT) fp32 rounding: a few ulps of the outputs' size
    assert (ours_unet - theirs_unet).abs().max() < 2e-5 * max(1, theirs_unet.abs().max())
    assert (ours_text - theirs_text).abs().max() < 2e-5 * max(1, theirs_text.abs().max())


# ---------------------------------------------------------------------------- textual inversion
def test_textual_inversion_trains_only_the_new_vectors(base, monkeypatch):
    seen = capture_parts(monkeypatch)
    result = train_textual_inversion(BUILTIN, base / "ti.toml", base / "ti", "zq",
                                     token_string=TOKEN, init_word="shape",
                                     num_vectors_per_token=2, max_train_steps=30,
                                     learning_rate=5e-2, **FAST)
    monkeypatch.undo()
    parts = seen[0]
    # the embedding table (and everything else) is bit-identical to the file's
    assert same_weights(parts.text_encoder, BUILTIN, "text_encoder")
    assert same_weights(parts.unet, BUILTIN, "unet")
    a1111, diffusers = result.outputs
    assert a1111.name == "zq.safetensors" and diffusers.name == "zq_learned_embeds.safetensors"
    assert set(load_file(str(a1111))) == {"emb_params"}
    assert set(load_file(str(diffusers))) == {TOKEN}
    vectors = read_embedding(a1111).vectors
    assert torch.equal(vectors, read_embedding(diffusers).vectors) and vectors.shape[0] == 2

    images, captions, _ = images_and_captions(base / "concept")
    tok = get_tokenizer()
    ids, slots = place_vectors(tok, ti_lookup(tok, TOKEN, 2), captions, 2)
    assert (slots >= 0).sum() == 2 * len(captions)
    init = initial_vectors(tok, parts.text_encoder.token_embedding, "shape", 2)
    assert not torch.equal(init, vectors)
    losses = [fixed_loss(parts.unet, parts.text_encoder, parts.vae, images,
                         {"input_ids": ids, "slots": slots}, train_text_encoder=True,
                         token_vectors=torch.nn.Parameter(v)) for v in (init, vectors)]
    print(f"textual inversion: fixed batch {losses[0]:.5f} -> {losses[1]:.5f}")
    assert losses[1] < 0.95 * losses[0]

    pipe = sdfast.load(BUILTIN, device="cpu")
    pipe.load_embedding(a1111)                        # triggered by its name, "zq"
    by_name = pipe.encode_prompt("a photo of zq")[0]
    pipe.unload_embedding("zq")
    pipe.load_embedding(diffusers)                    # triggered by its token
    by_token = pipe.encode_prompt(f"a photo of {TOKEN}")[0]
    assert torch.equal(by_name, by_token)


@pytest.mark.parametrize("kind", ["small_sd1", "small_sd2"])
def test_textual_inversion_files_load_in_diffusers(kind, tmp_path):
    from _pipelines import family_of, make_reference, save_single_file

    ref = make_reference(kind, tmp_path)
    single = save_single_file(ref, family_of(kind), tmp_path / "model.safetensors")
    config = toml(tmp_path / "d.toml", subset(concept_images(tmp_path / "c", 4,
                                                             f"a {TOKEN} on a table")))
    result = train_textual_inversion(single, config, tmp_path / "out", "zq", token_string=TOKEN,
                                     num_vectors_per_token=3, init_word="red shape",
                                     max_train_steps=2, learning_rate=0.5, **FAST)
    ours = sdfast.load(single, device="cpu")
    ours.load_embedding(result.outputs[1])
    ref.load_textual_inversion(str(result.outputs[1]))               # the diffusers file
    ref.load_textual_inversion(str(result.outputs[0]), token="zq")   # A1111 emb_params + token
    prompt = f"a photo of {TOKEN} on a table"
    with torch.no_grad():
        theirs = ref.encode_prompt(prompt, "cpu", 1, False)[0]
        theirs_a1111 = ref.encode_prompt("a photo of zq on a table", "cpu", 1, False)[0]
    got = ours.encode_prompt(prompt)[0]
    plain = ours.encode_prompt("a photo of on a table")[0]
    assert (got - theirs).abs().max() < 1e-5 and (got - theirs_a1111).abs().max() < 1e-5
    assert (got - plain).abs().max() > 1e-2


# ---------------------------------------------------------------------------- DreamBooth
def dreambooth_config(root, class_images=0):
    concept_images(root / "instance", 4, "a sks shape")
    (root / "class").mkdir()
    concept_images(root / "class", class_images, "a shape",
                   spec=ShapeSpec("square", "green", "top left", "small", "white"), seed=5)
    return toml(root / "db.toml", subset(root / "instance") + subset(
        root / "class", is_reg=True, class_tokens="a shape"), batch_size=2)


def test_dreambooth_generates_class_images_then_trains_on_both(tmp_path, base):
    config = dreambooth_config(tmp_path)
    result = train_dreambooth(base / "tiny.safetensors", config, tmp_path / "out", "db",
                              max_train_steps=12, learning_rate=2e-3, num_class_images=3,
                              class_sample_steps=2, prior_loss_weight=0.5, **FAST)
    made = sorted((tmp_path / "class").glob("*.png"))
    assert [p.name for p in made] == [f"{CLASS_PREFIX}{k:05d}.png" for k in range(3)]
    pipe = sdfast.load(base / "tiny.safetensors", device="cpu")
    # rendered by the model being trained, in one batch (batch-1 matmuls round differently)
    expected = pipe.generate(["a shape"] * 3, width=64, height=64, steps=2, cfg=7.0,
                             seed=[class_image_seed(7, k) for k in range(3)], progress=False)
    for path, expected in zip(made, expected):
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image), np.asarray(expected))
            assert image.info["parameters"].startswith("a shape\nSteps: 2")
    data = TrainData(load_dataset_config(config))
    for batch in data.epoch_batches(7, 0):            # every batch: instance + class images
        kinds = [data.items[i].subset.is_reg for i in batch]
        assert kinds == [False] * (len(batch) // 2) + [True] * (len(batch) // 2)
    images, captions, _ = images_and_captions(tmp_path / "instance")
    before = fixed_loss(pipe.unet, pipe.text_encoder, pipe.vae, images, ids_of(captions))
    tuned = sdfast.load(result.output, device="cpu")
    after = fixed_loss(tuned.unet, tuned.text_encoder, tuned.vae, images, ids_of(captions))
    print(f"DreamBooth: fixed batch {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    assert same_weights(tuned.vae, base / "tiny.safetensors", "vae")


def test_prior_loss_weight_weights_class_images(tmp_path, base, monkeypatch):
    config = dreambooth_config(tmp_path, class_images=2)
    seen = []
    real = sdfast.train.objectives.DiffusionObjective.forward

    def spy(self, *args, weights=None, **kwargs):
        seen.append(weights)
        return real(self, *args, weights=weights, **kwargs)
    monkeypatch.setattr(sdfast.train.objectives.DiffusionObjective, "forward", spy)
    train_dreambooth(base / "tiny.safetensors", config, tmp_path / "out", "db",
                     max_train_steps=1, num_class_images=0, prior_loss_weight=0.25, **FAST)
    assert seen[0].tolist() == [1.0, 1.0, 0.25, 0.25]


# ---------------------------------------------------------------------------- ControlNet
def test_controlnet_starts_as_a_no_op():
    unet = tiny_models()[0]
    net = init_controlnet(unet, seed=0)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen)
    t, hint = torch.tensor([10.0, 700.0]), torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        residuals = net(x, hint, t, ctx)
        assert all(not r.any() for r in residuals)
        assert torch.equal(unet(x, t, ctx, control=residuals), unet(x, t, ctx))
    encoder = {k: v for k, v in unet.state_dict().items()
               if k.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in encoder.items())


def test_controlnet_trains_with_the_unet_frozen(base, monkeypatch):
    seen = capture_parts(monkeypatch)
    result = train_controlnet(base / "tiny.safetensors", base / "control.toml", base / "cn",
                              "cn", max_train_steps=20, learning_rate=1e-3, **FAST)
    monkeypatch.undo()
    assert same_weights(seen[0].unet, base / "tiny.safetensors", "unet")
    assert same_weights(seen[0].text_encoder, base / "tiny.safetensors", "text_encoder")
    sd = load_file(str(result.output))
    assert all(k.startswith("control_model.") for k in sd) and \
        "control_model.input_hint_block.14.weight" in sd
    net = sdfast.load_controlnet(result.output, device="cpu")
    images, captions, paths = images_and_captions(base / "data" / "images")
    hints = torch.stack([(load_image(base / "cond" / p.name, (64, 64)) + 1) / 2 for p in paths])
    parts = load_components(base / "tiny.safetensors")
    args = (parts.unet, parts.text_encoder, parts.vae, images, ids_of(captions))
    before = fixed_loss(*args, controlnet=init_controlnet(parts.unet), hints=hints)
    plain = fixed_loss(*args)
    after = fixed_loss(*args, controlnet=net, hints=hints)
    print(f"ControlNet: fixed batch {before:.4f} (plain UNet {plain:.4f}) -> {after:.4f}")
    assert before == plain                    # the untrained ControlNet changes nothing
    assert after < 0.95 * before              # the trained one is no longer a no-op: it helps


# ---------------------------------------------------------------------------- resume, saves
METHOD_RUNS = {
    "lora": lambda b: (train_lora, b / "tiny.safetensors", b / "data.toml",
                       dict(learning_rate=1e-2, network_dim=2, conv_dim=2)),
    "textual-inversion": lambda b: (train_textual_inversion, b / "tiny.safetensors",
                                    b / "ti.toml", dict(token_string=TOKEN, learning_rate=0.1,
                                                        num_vectors_per_token=2)),
    "controlnet": lambda b: (train_controlnet, b / "tiny.safetensors", b / "control.toml",
                             dict(learning_rate=1e-3)),
}


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_resume_equals_uninterrupted(base, tmp_path, monkeypatch, method):
    function, model, config, kwargs = METHOD_RUNS[method](base)
    kwargs = {**FAST, **kwargs, "max_train_steps": 5, "save_every_n_steps": 2,
              "cache_latents": method != "controlnet"}          # one run reads the VAE
    whole = function(model, config, tmp_path / "whole", "m", **kwargs)
    interrupt_at(monkeypatch, 3)             # dies in step 4, after the save at step 2
    with pytest.raises(KeyboardInterrupt):
        function(model, config, tmp_path / "cut", "m", **kwargs)
    monkeypatch.undo()
    resumed = function(model, config, tmp_path / "cut", "m", resume=tmp_path / "cut", **kwargs)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7)
    for a, b in zip(whole.outputs, resumed.outputs):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert sa.keys() == sb.keys()
        assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-6


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_gradient_checkpointing_and_accumulation_keep_the_result(base, tmp_path, method):
    function, model, config, kwargs = METHOD_RUNS[method](base)
    kwargs = {**FAST, **kwargs, "max_train_steps": 2, "gradient_accumulation_steps": 2,
              "noise_offset": 0.1}
    plain = function(model, config, tmp_path / "plain", "m", **kwargs)
    recomputed = function(model, config, tmp_path / "ckpt", "m", gradient_checkpointing=True,
                          **kwargs)
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = load_file(str(plain.output)), load_file(str(recomputed.output))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # bf16 autocast, SGD and a warmed-up cosine schedule run too (losses near the fp32 ones)
    low = function(model, config, tmp_path / "bf16", "m", mixed_precision="bf16",
                   optimizer="sgd", lr_scheduler="cosine", lr_warmup_steps=1, **kwargs)
    assert low.losses[0] == pytest.approx(plain.losses[0], rel=0.05)
    assert low.lrs == pytest.approx([kwargs["learning_rate"] / 2, kwargs["learning_rate"]])


def test_training_state_holds_only_what_trains(base, lora_run):
    state = load_file(str(lora_run.state_dir / "model.safetensors"))
    assert state and all(".parametrizations." in k and k.endswith(("lora_down", "lora_up"))
                         for k in state)


def test_interrupted_save_leaves_previous_files(base, tmp_path, monkeypatch):
    kwargs = dict(token_string=TOKEN, learning_rate=0.1, save_every_n_steps=2, **FAST)
    args = (base / "tiny.safetensors", base / "ti.toml", tmp_path / "ti", "zq")
    first = train_textual_inversion(*args, max_train_steps=2, **kwargs)
    before = [p.read_bytes() for p in first.outputs]
    real = safetensors.torch.save_file
    calls = []

    def dies_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:                   # the A1111 file is replaced, then the disk fills
            real(tensors, filename, metadata=metadata)
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)
    shutil.copytree(tmp_path / "ti", tmp_path / "ti2")
    monkeypatch.setattr(safetensors.torch, "save_file", dies_on_second)
    with pytest.raises(OSError, match="disk full"):         # continue to 3 steps: same names
        train_textual_inversion(*args[:2], tmp_path / "ti2", "zq", max_train_steps=3,
                                resume=tmp_path / "ti2" / "state-00000002", **kwargs)
    monkeypatch.undo()
    assert (tmp_path / "ti2" / "zq_learned_embeds.safetensors").read_bytes() == before[1]
    assert not [p for p in (tmp_path / "ti2").iterdir() if ".tmp" in p.name]
    read_embedding(tmp_path / "ti2" / "zq.safetensors")       # whole, never a partial file


# ---------------------------------------------------------------------------- errors, CLI
def test_bad_method_options_are_refused(base, tmp_path):
    tiny, data = base / "tiny.safetensors", base / "data.toml"
    cases = [
        (train_lora, data, dict(network_train_unet_only=True,
                                network_train_text_encoder_only=True), "exclude each other"),
        (train_lora, data, dict(network_dim=0), "network_dim"),
        (train_textual_inversion, base / "ti.toml", dict(token_string="two words"),
         "one word"),
        (train_textual_inversion, base / "ti.toml", dict(token_string=TOKEN,
                                                         init_word="a b c"), "3 tokens"),
        (train_textual_inversion, data, dict(token_string=TOKEN), "no caption contains"),
        (train_controlnet, data, {}, "conditioning_data_dir in every subset"),
        (train_lora, base / "control.toml", {}, "conditioning_data_dir is for ControlNet"),
    ]
    for function, config, kwargs, words in cases:
        with pytest.raises(SdfastError, match=words):
            function(tiny, config, tmp_path / "out", "x", progress=False, **kwargs)
    (tmp_path / "empty").mkdir()
    config = toml(tmp_path / "reg.toml", subset(base / "concept") + subset(
        tmp_path / "empty", is_reg=True, class_tokens="shape"))
    with pytest.raises(SdfastError, match="holds no images"):
        train_lora(tiny, config, tmp_path / "out", "x", progress=False)
    with pytest.raises(SdfastError, match="is_reg subsets are for DreamBooth"):
        train_controlnet(tiny, config, tmp_path / "out", "x", progress=False)
    with pytest.raises(SdfastError, match="holds no images"):
        train_dreambooth(tiny, config, tmp_path / "out", "x", num_class_images=0,
                         progress=False)
    assert not (tmp_path / "out" / "x.safetensors").exists()


def test_cli_methods(base, tmp_path, capsys):
    common = ["--model", str(base / "tiny.safetensors"), "--max-train-steps", "1", "--quiet",
              "--cache-latents"]
    common += ["--output-dir", str(tmp_path / "o")]
    assert train_main(["textual-inversion", *common, "--dataset-config", str(base / "ti.toml"),
                       "--output-name", "e"]) == 2
    assert "--token-string" in capsys.readouterr().err
    assert train_main(["textual-inversion", *common, "--dataset-config", str(base / "ti.toml"),
                       "--output-name", "e", "--token-string", TOKEN, "--init-word", "a b",
                       "--num-vectors-per-token", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_word 'a b' is 2 tokens" in err[0]
    assert train_main(["lora", *common, "--dataset-config", str(base / "data.toml"),
                       "--output-name", "l", "--network-dim", "2", "--conv-dim", "1",
                       "--unet-lr", "1e-3", "--network-train-unet-only"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o" / "l.safetensors")
    names = {k.split(".")[0] for k in load_file(str(tmp_path / "o" / "l.safetensors"))}
    assert names and not any(n.startswith("lora_te_") for n in names)
    common[-1] = str(tmp_path / "o2")                 # one run per output folder
    assert train_main(["textual-inversion", *common, "--dataset-config", str(base / "ti.toml"),
                       "--output-name", "e", "--token-string", TOKEN]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "o2" / "e.safetensors"), str(
        tmp_path / "o2" / "e_learned_embeds.safetensors")]
    assert train_main(["dreambooth", *common, "--dataset-config", str(base / "data.toml"),
                       "--output-name", "d", "--prior-loss-weight", "-1"]) == 2
    assert "prior-loss-weight" in capsys.readouterr().err
    assert train_main([]) == 2 and "controlnet" in capsys.readouterr().err
