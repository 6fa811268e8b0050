"""The shapes evaluator: prompt selection, scoring with fake pipelines, batching, JSON, the
`sdfast eval shapes` command, and one real run on a tiny random-weight model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdfast
import sdfast.builtin
from sdfast.cli import _Parser
from sdfast.data.shapes import COLORS, ShapeSpec, heldout_specs, is_held_out, render
from sdfast.errors import SdfastError
from sdfast.eval.analyser import parse_caption
from sdfast.eval.cli import register
from sdfast.eval.shapes_eval import evaluate, format_table, select_prompts, write_json

ATTRS = ("color", "shape", "position", "size", "background")


class TruthPipe:
    """A fake pipeline: draws exactly what each (canonical) prompt asks for, and logs calls."""

    source = "fake"

    def __init__(self):
        self.calls = []

    def generate(self, prompt, negative_prompt="", *, width, height, steps, cfg, sampler,
                 scheduler, seed, batch_size, output="pil", progress=True):
        assert (width, height, batch_size, output) == (64, 64, 1, "pil")
        self.calls.append((prompt, seed))
        return [render(self.draw(parse_caption(prompt), seed))]

    def draw(self, spec, seed):
        return spec


class WrongColourPipe(TruthPipe):
    """Draws the shape in another colour (never the background's): only colour is wrong."""

    def draw(self, spec, seed):
        others = [c for c in COLORS if c not in (spec.color, spec.background)]
        return ShapeSpec(spec.shape, others[seed % len(others)], spec.position, spec.size,
                         spec.background)


class SeedDependentPipe(TruthPipe):
    """Right on seeds that are not multiples of 3, wrong colour on the others."""

    def draw(self, spec, seed):
        return spec if seed % 3 else WrongColourPipe.draw(self, spec, seed)


# ------------------------------------------------------------------------------------ prompts
def test_prompt_selection_is_seeded_held_out_and_prefix_stable():
    a, b = select_prompts(40, seed=7), select_prompts(40, seed=7)
    assert a == b
    assert [p for p, _, _ in select_prompts(40, seed=8)] != [p for p, _, _ in a]
    assert all(is_held_out(spec) and expected == spec for _, spec, expected in a)
    assert len({spec for _, spec, _ in a}) == 40                  # one pass: no repeats
    assert select_prompts(10, seed=7) == a[:10]
    # Canonical captions say everything, and the analyser's parser reads it back.
    assert all(parse_caption(prompt) == spec for prompt, spec, _ in a)


def test_more_prompts_than_the_split_cover_it_evenly():
    pool = heldout_specs()
    prompts = select_prompts(len(pool) + 5, seed=1)
    counts = {}
    for _, spec, _ in prompts:
        counts[spec] = counts.get(spec, 0) + 1
    assert set(counts) == set(pool) and max(counts.values()) == 2


def test_variety_captions_score_only_what_they_name():
    prompts = select_prompts(60, seed=3, variety=True)
    assert [spec for _, spec, _ in prompts] == [spec for _, spec, _ in select_prompts(60, seed=3)]
    assert len({p for p, _, _ in prompts} - {p for p, _, _ in select_prompts(60, seed=3)}) > 30
    for prompt, _, expected in prompts:
        assert parse_caption(prompt) == expected
    assert any(None in (e.size, e.position, e.background) for _, _, e in prompts)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"n": 0}, "n must be"), ({"split": "test"}, "split"), ({"sampler": "nope"}, "sampler"),
    ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"), ({"steps": 0}, "steps"),
    ({"cfg": float("nan")}, "cfg"),
])
def test_bad_arguments_raise_before_generating(kwargs, pattern):
    pipe = TruthPipe()
    with pytest.raises(SdfastError, match=pattern):
        evaluate(pipe, **{"n": 4, **kwargs})
    assert pipe.calls == []


# ------------------------------------------------------------------------------------ scoring
def test_ground_truth_pipeline_scores_one_everywhere():
    pipe = TruthPipe()
    result = evaluate(pipe, n=24, seed=5, batch_size=5)
    assert result["accuracy"] == dict.fromkeys((*ATTRS, "all"), 1.0)
    assert result["n"] == 24 and result["correct"]["all"] == 24
    assert pipe.calls == [(p, 5 + i) for i, (p, _, _) in enumerate(select_prompts(24, seed=5))]
    row = result["samples"][3]
    assert row["seed"] == 8 and row["ok"] and row["analysis"] == row["expected"]
    assert result["settings"]["split"] == "heldout" and result["settings"]["model"] == "fake"


def test_wrong_colour_scores_zero_on_colour_only():
    result = evaluate(WrongColourPipe(), n=24, seed=2)
    acc = result["accuracy"]
    assert acc["color"] == 0.0 and acc["all"] == 0.0
    assert acc["shape"] == acc["position"] == acc["size"] == acc["background"] == 1.0
    assert all(row["correct"]["color"] is False and not row["ok"] for row in result["samples"])
    table = format_table(result)
    assert "colour" in table and "0.0%" in table and "100.0%" in table


def test_variety_run_leaves_unnamed_attributes_unscored():
    class VarietyTruth(TruthPipe):
        def draw(self, spec, seed):                   # fill what the caption left out
            full = {"position": "middle center", "size": "large",
                    "background": "white" if spec.color != "white" else "black"}
            return ShapeSpec(**{k: v if v is not None else full[k]
                                for k, v in vars(spec).items()})

    result = evaluate(VarietyTruth(), n=40, seed=4, variety=True)
    assert result["accuracy"]["all"] == 1.0
    assert result["counts"]["color"] == 40 and result["counts"]["size"] < 40
    assert any(row["correct"]["size"] is None for row in result["samples"])


def test_results_do_not_depend_on_batch_size():
    runs = [evaluate(SeedDependentPipe(), n=20, seed=1, batch_size=b)["samples"]
            for b in (1, 3, 16, 64)]
    assert all(run == runs[0] for run in runs[1:])
    assert {row["ok"] for row in runs[0]} == {True, False}            # the seeds mattered


# --------------------------------------------------------------------------------------- JSON
def test_json_is_written_atomically_and_never_overwritten_by_default(tmp_path):
    result = evaluate(TruthPipe(), n=6)
    path = tmp_path / "r.json"
    assert write_json(result, path) == path
    assert json.loads(path.read_text()) == result
    with pytest.raises(SdfastError, match="exists"):
        write_json({"other": 1}, path)
    assert json.loads(path.read_text()) == result
    write_json({"other": 1}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"other": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]    # no temporary left
    with pytest.raises(SdfastError, match="no such directory"):
        write_json(result, tmp_path / "missing" / "r.json")


# ---------------------------------------------------------------------------------------- CLI
def _parse(argv):
    parser = _Parser(prog="sdfast")
    register(parser.add_subparsers(dest="command", parser_class=_Parser))
    return parser.parse_args(argv)


def test_cli_errors_are_sdfast_errors(tmp_path, monkeypatch):
    with pytest.raises(SdfastError, match="invalid choice"):
        _parse(["eval", "shapes", "--split", "test"])
    with pytest.raises(SdfastError, match="must be >= 1"):
        _parse(["eval", "shapes", "--n", "0"])
    args = _parse(["eval", "shapes", "--seed", "-1", "--model", str(tmp_path / "m")])
    with pytest.raises(SdfastError, match="seed must be"):           # before the model is read
        args.func(args)
    args = _parse(["eval"])
    with pytest.raises(SdfastError, match="sub-command"):
        args.func(args)
    monkeypatch.setattr(sdfast.builtin, "MODEL_PATH", tmp_path / "absent.safetensors")
    args = _parse(["eval", "shapes"])
    with pytest.raises(SdfastError, match="built-in model is not installed"):
        args.func(args)
    (tmp_path / "taken.json").write_text("{}")
    args = _parse(["eval", "shapes", "--json", str(tmp_path / "taken.json")])
    with pytest.raises(SdfastError, match="exists"):
        args.func(args)


# ------------------------------------------------------------------------ real model, end to end
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model runs as fast on one thread, and a second OpenMP thread on shared cores
    can stall for seconds per op (measured here: 9 s vs 70 s for this file under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    sdfast.builtin.init_checkpoint(path)
    return path


def test_cli_end_to_end_on_a_tiny_model(tiny_model, tmp_path, capsys):
    out, images = tmp_path / "r.json", tmp_path / "images"
    args = _parse(["eval", "shapes", "--model", str(tiny_model), "--n", "4", "--steps", "2",
                   "--batch", "3", "--json", str(out), "--save-images", str(images), "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "colour" in printed and "background" in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["n"] == 4 and result["settings"]["steps"] == 2
    assert [row["prompt"] for row in result["samples"]] == [p for p, _, _ in select_prompts(4)]
    assert all(0.0 <= result["accuracy"][a] <= 1.0 for a in (*ATTRS, "all"))
    assert sorted(p.name for p in images.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    with Image.open(images / "00002.png") as png:
        assert png.size == (64, 64) and "Seed: 2" in png.info["parameters"]


@pytest.fixture(scope="module")
def sensitive_pipe(tiny_model):
    """The tiny model with its zero-initialised output layers and its near-zero token embeddings
    randomised, so that both the prompt and every noise draw visibly change the image."""
    pipe = sdfast.load(tiny_model, device="cpu")
    torch.manual_seed(0)
    for name, module in pipe.unet.named_modules():
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            torch.nn.init.normal_(module.weight, std=0.3)
    torch.nn.init.normal_(pipe.text_encoder.token_embedding.weight, std=1.0)
    return pipe


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_sde"])
def test_batched_sampling_matches_generate_one_by_one(sensitive_pipe, tmp_path, sampler):
    pipe, folder = sensitive_pipe, tmp_path / sampler
    result = evaluate(pipe, n=3, seed=10, steps=4, sampler=sampler, batch_size=3,
                      save_images=folder)
    alone = [np.asarray(pipe.generate(
        row["prompt"], width=64, height=64, steps=4, cfg=5.0, sampler=sampler,
        scheduler="normal", seed=row["seed"], progress=False)[0], np.int16)
        for row in result["samples"]]
    for index, expected in enumerate(alone):
        with Image.open(folder / f"{index:05d}.png") as png:
            batched = np.asarray(png, np.int16)
        assert np.abs(batched - expected).max() <= 2, index
    # The check has teeth: another prompt with the same seed changes the image visibly.
    other = np.asarray(pipe.generate(result["samples"][1]["prompt"], width=64, height=64,
                                     steps=4, cfg=5.0, sampler=sampler, seed=10,
                                     progress=False)[0], np.int16)
    assert np.abs(other - alone[0]).max() > 8
    with pytest.raises(SdfastError, match="exists"):
        evaluate(pipe, n=3, seed=10, steps=2, save_images=folder)
