"""Textual-inversion embeddings: file formats, triggers, chunk layout, and exact conditioning.

The exactness check needs no reference implementation: an embedding whose vectors are the
token-embedding rows of "red circle" must condition exactly like typing "red circle", in both
prompt syntaxes, with weights and in long prompts, on SD1 (CLIP) and SD2 (OpenCLIP) encoders.
"""
import pytest
import torch
from safetensors.torch import save_file

import sdfast
from _pipelines import family_of, make_reference, save_single_file
from sdfast.errors import SdfastError
from sdfast.text import get_tokenizer
from sdfast.text.chunks import tokenize_prompt


@pytest.fixture(scope="module", params=["builtin", "small_sd2"])
def pipe(request, tmp_path_factory):
    if request.param == "builtin":
        return sdfast.load()
    tmp = tmp_path_factory.mktemp("sd2")
    ref = make_reference("small_sd2", tmp)
    return sdfast.load(save_single_file(ref, family_of("small_sd2"), tmp / "model.safetensors"))


def word_vectors(pipe, words):
    ids = pipe.tokenizer.encode(words)
    with torch.no_grad():
        return pipe.text_encoder.token_embedding.weight[ids].detach().clone()     # [n, C]


def write_formats(vectors, folder):
    """The same vectors in every supported format; returns {format: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"a1111_pt": folder / "redthing.pt", "a1111_st": folder / "redthing2.safetensors",
             "diffusers_bin": folder / "learned_embeds.bin",
             "diffusers_st": folder / "learned_embeds2.safetensors"}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()},
                "name": "redthing", "step": 1000, "sd_checkpoint": "abc", "sd_checkpoint_name": "x"},
               paths["a1111_pt"])
    save_file({"emb_params": vectors.clone()}, str(paths["a1111_st"]))
    torch.save({"<red-thing>": vectors.clone()}, paths["diffusers_bin"])
    save_file({"<red-thing2>": vectors.clone()}, str(paths["diffusers_st"]))
    return paths


@pytest.mark.parametrize("weighting", ["a1111", "comfy"])
def test_embedding_conditions_exactly_like_the_words_it_copies(pipe, tmp_path, weighting):
    vectors = word_vectors(pipe, "red circle")
    assert vectors.shape[0] == 2
    paths = write_formats(vectors, tmp_path)
    name = pipe.load_embedding(paths["a1111_pt"])
    try:
        assert name == "redthing" and pipe.embeddings[name]["vectors"] == 2
        trigger = "embedding:redthing" if weighting == "comfy" else "redthing"
        long_tail = ", ".join(["a small blue square"] * 20)            # > 75 tokens: 2+ chunks
        for words, plain in ((f"a {trigger} at the top left", "a red circle at the top left"),
                             (f"a ({trigger}:1.3) at the top", "a (red circle:1.3) at the top"),
                             (f"{long_tail}, {trigger}", f"{long_tail}, red circle")):
            got = pipe.encode_prompt(words, "", weighting=weighting)[0]
            want = pipe.encode_prompt(plain, "", weighting=weighting)[0]
            assert got.shape == want.shape
            assert torch.equal(got, want), (words, (got - want).abs().max())
        # and it is not a no-op: other vectors change the conditioning
        pipe.unload_embedding("redthing")
        pipe.load_embedding(paths["a1111_st"], token="redthing")
        assert torch.equal(pipe.encode_prompt(f"a {trigger}", weighting=weighting)[0],
                           pipe.encode_prompt("a red circle", weighting=weighting)[0])
        pipe.unload_embedding("redthing")
        torch.save({"string_to_param": {"*": vectors.flip(0)}}, tmp_path / "flipped.pt")
        pipe.load_embedding(tmp_path / "flipped.pt", token="redthing")
        assert not torch.equal(pipe.encode_prompt(f"a {trigger}", weighting=weighting)[0],
                               pipe.encode_prompt("a red circle", weighting=weighting)[0])
    finally:
        pipe._embeddings.clear()


def test_every_format_reads_the_same_vectors_and_triggers(pipe, tmp_path):
    vectors = word_vectors(pipe, "red circle")
    paths = write_formats(vectors, tmp_path)
    want = pipe.encode_prompt("a red circle")[0]
    try:
        for fmt, path in paths.items():
            name = pipe.load_embedding(path)
            triggers = [name] + (["<red-thing>"] if fmt == "diffusers_bin" else [])
            triggers += ["<red-thing2>"] if fmt == "diffusers_st" else []
            for trigger in triggers:
                assert torch.equal(pipe.encode_prompt(f"a {trigger}")[0], want), (fmt, trigger)
            pipe.unload_embedding(name)
    finally:
        pipe._embeddings.clear()


def test_wrong_width_and_bad_files_are_clear_errors(pipe, tmp_path):
    width = pipe.text_encoder.token_embedding.weight.shape[1]
    save_file({"emb_params": torch.zeros(2, 768 if width != 768 else 1024)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SdfastError, match=rf"is {768 if width != 768 else 1024} wide but this model's "
                                          rf"text encoder is {width} wide"):
        pipe.load_embedding(tmp_path / "w.safetensors")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(SdfastError, match="SDXL"):
        pipe.load_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SdfastError, match="not an embedding"):
        pipe.load_embedding(tmp_path / "two.safetensors")
    with pytest.raises(SdfastError, match="no such embedding file"):
        pipe.load_embedding(tmp_path / "missing.pt")
    with pytest.raises(SdfastError, match="unknown embedding 'nothing'"):
        pipe.load_embedding(_write_any(pipe, tmp_path))
        pipe.encode_prompt("a embedding:nothing", weighting="comfy")
    pipe._embeddings.clear()
    assert pipe.embeddings == {}


def _write_any(pipe, tmp_path):
    path = tmp_path / "anything.pt"
    torch.save({"string_to_param": {"*": word_vectors(pipe, "cat")}}, path)
    return path


def test_embeddings_dir_loads_only_what_prompts_name(pipe, tmp_path):
    folder = tmp_path / "embeddings"
    paths = write_formats(word_vectors(pipe, "red circle"), folder / "sub")
    save_file({"emb_params": torch.zeros(1, 3)}, str(folder / "broken.safetensors"))  # wrong width
    pipe.embeddings_dir = folder
    try:
        want = pipe.encode_prompt("a red circle")[0]
        assert torch.equal(pipe.encode_prompt("a redthing")[0], want)
        assert set(map(str, pipe._dir_embeddings)) == {str(paths["a1111_pt"])}   # only the named one
        assert pipe.embeddings == {}                                            # nothing pinned
        with pytest.raises(SdfastError, match="wide"):
            pipe.encode_prompt("a broken thing")
    finally:
        pipe.embeddings_dir = None
        pipe._dir_embeddings.clear()


def test_vectors_count_toward_chunks_and_never_split():
    tok = get_tokenizer()
    emb = {"tri": torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)}
    filler = " ".join(["cat"] * 74)                       # 74 tokens: 1 place left in chunk 1
    chunks = tokenize_prompt(tok, f"{filler} tri dog", embeddings=emb, comma_backtrack=0)
    assert len(chunks) == 2
    assert chunks[0].fixes == []
    assert [o for o, _ in chunks[1].fixes] == [0, 1, 2]   # moved whole to the next chunk
    assert chunks[1].ids[1:4] == [0, 0, 0]
    assert torch.equal(torch.cat([v for _, v in chunks[1].fixes]), emb["tri"])
    chunks = tokenize_prompt(tok, "(tri:1.5) dog", embeddings=emb)
    assert chunks[0].weights[1:5] == [1.5, 1.5, 1.5, 1.0]
    assert len(tokenize_prompt(tok, f"{filler} dog dog", embeddings=emb)) == 2
    comfy = tokenize_prompt(tok, "a embedding:tri, dog", syntax="comfy", embeddings=emb)
    assert [o for o, _ in comfy[0].fixes] == [1, 2, 3]
    assert tok.decode(comfy[0].ids[5:7]) == ", dog"


def test_cli_embedding_flags(tmp_path):
    from PIL import Image

    from test_cli import assert_one_line_error, run_cli

    pipe = sdfast.load()
    torch.save({"string_to_param": {"*": word_vectors(pipe, "red circle")}}, tmp_path / "redthing.pt")
    common = ["generate", "--steps", "1", "--quiet", "--seed", "3"]
    outs = {}
    for label, prompt, extra in (("words", "a red circle", []),
                                 ("flag", "a redthing", ["--embedding", str(tmp_path / "redthing.pt")]),
                                 ("dir", "a redthing", ["--embeddings-dir", str(tmp_path)])):
        rc, _, err = run_cli(*common, "--prompt", prompt, "-o", str(tmp_path / f"{label}.png"), *extra)
        assert rc == 0, err
        with Image.open(tmp_path / f"{label}.png") as img:
            outs[label] = img.tobytes()
    assert outs["words"] == outs["flag"] == outs["dir"]
    rc, _, err = run_cli(*common, "--prompt", "x", "--embedding", str(tmp_path / "nope.pt"))
    assert_one_line_error(rc, err, "no such embedding file")


@pytest.mark.parametrize("kind", ["small_sd1", "small_sd2"])
def test_a1111_embedding_matches_diffusers_load_textual_inversion(kind, tmp_path):
    ref = make_reference(kind, tmp_path)
    ours = sdfast.load(save_single_file(ref, family_of(kind), tmp_path / "model.safetensors"))
    width = ours.text_encoder.token_embedding.weight.shape[1]
    vectors = torch.randn(3, width, generator=torch.Generator().manual_seed(4)) * 0.05
    torch.save({"string_to_param": {"*": vectors}, "name": "shinystyle", "step": 10},
               tmp_path / "shinystyle.pt")
    ours.load_embedding(tmp_path / "shinystyle.pt")
    ref.load_textual_inversion(str(tmp_path / "shinystyle.pt"), token="shinystyle")
    prompt = "a photo of shinystyle on a table"
    with torch.no_grad():
        theirs, _ = ref.encode_prompt(prompt, "cpu", 1, False)
    got = ours.encode_prompt(prompt, "")[0]
    plain = ours.encode_prompt("a photo of on a table", "")[0]
    assert got.shape == theirs.shape
    assert (got - theirs).abs().max().item() < 1e-5            # as test_pipeline's ENCODE_TOL
    assert (got - plain).abs().max().item() > 1e-2
