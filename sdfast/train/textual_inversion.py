"""`train_textual_inversion`: learn `num_vectors_per_token` embedding vectors for a new word
`token_string` (Gal et al. 2022, "An Image is Worth One Word"), everything else frozen.

The vectors are the only parameters: the text encoder's embedding table is never written, so
every existing token row stays bit-identical. In a caption, each occurrence of `token_string`
(matched on token ids, as the pipeline matches an embedding's name at inference,
`sdfast.addons.embeddings.EmbeddingLookup`) becomes `num_vectors_per_token` placeholder tokens
whose input embeddings are the trained vectors (`DiffusionObjective.encode_text`): the same
placement the pipeline uses when the embedding is loaded, so what trains is what generates.
The vectors start as the embeddings of `init_word`'s tokens (repeated to fill them, as kohya).

Each save writes two files with the same vectors:
- `NAME.safetensors`: A1111 / kohya (`{"emb_params": [n, C]}`), triggered by its file name;
- `NAME_learned_embeds.safetensors`: diffusers (`{token_string: [n, C]}`), which
  `load_textual_inversion` reads and which sdfast triggers by `token_string` too.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import SdfastError
from ..text import get_tokenizer
from .common import SAVE_PRECISIONS
from .engine import Method, TrainResult, diffusion_objective, positive, run_method
from .run import RUN_ID_KEY

DIFFUSERS_SUFFIX = "_learned_embeds"
MAX_VECTORS = 75                # a prompt chunk's content tokens


def _lookup(tokenizer, token_string, count, width=1):
    from ..addons.embeddings import Embedding, EmbeddingLookup

    return EmbeddingLookup(tokenizer, [Embedding(token_string, torch.zeros(count, width))])


def place_vectors(tokenizer, lookup, captions, count):
    """`(ids, slots)`, both `[B, 77]`: the captions tokenized as the tokenizer does, with each
    occurrence of the looked-up word replaced by `count` placeholder ids whose `slots` are
    0..count-1 (-1 elsewhere). Content is cut to 75 tokens, as `CLIPTokenizer.__call__` does."""
    from ..text.chunks import PLACEHOLDER_ID

    width = tokenizer.max_length - 2
    all_ids, all_slots = [], []
    for tokens in tokenizer.encode_batch(captions):
        row, slots, i = [], [], 0
        while i < len(tokens):
            found = lookup.match(tokens, i)
            if found is None:
                row.append(tokens[i])
                slots.append(-1)
                i += 1
                continue
            row += [PLACEHOLDER_ID] * count
            slots += list(range(count))
            i += found[1]
        row, slots = row[:width], slots[:width]
        all_ids.append(tokenizer.pad_row(row))
        all_slots.append([-1, *slots] + [-1] * (tokenizer.max_length - 1 - len(slots)))
    return torch.tensor(all_ids), torch.tensor(all_slots)


def init_tokens(tokenizer, init_word, count):
    """The token ids the `count` vectors start from: `init_word`'s, repeated in turn."""
    ids = tokenizer.encode(init_word)
    if not ids:
        raise SdfastError(f"init_word {init_word!r} has no tokens")
    if len(ids) > count:
        raise SdfastError(f"init_word {init_word!r} is {len(ids)} tokens but "
                          f"num_vectors_per_token is {count} (use more vectors or another word)")
    return [ids[i % len(ids)] for i in range(count)]


def initial_vectors(tokenizer, token_embedding, init_word, count):
    """`[count, C]`: the embeddings of `init_tokens`."""
    rows = torch.tensor(init_tokens(tokenizer, init_word, count))
    return token_embedding.weight.detach()[rows].float().clone()


class TextualInversion(Method):
    """New embedding vectors for `token_string` (module docstring)."""

    name = "textual-inversion"
    suffixes = ("", DIFFUSERS_SUFFIX)
    settings = ("token_string", "init_word", "num_vectors_per_token")

    def check_options(self, o):
        token = o["token_string"]
        if not isinstance(token, str) or not token or re.search(r"[\s,]", token):
            raise SdfastError(f"token_string must be one word without spaces or commas, "
                              f"got {token!r}")
        if not isinstance(o["init_word"], str) or not o["init_word"].strip():
            raise SdfastError(f"init_word must be a non-empty string, got {o['init_word']!r}")
        positive("num_vectors_per_token", o["num_vectors_per_token"])
        if o["num_vectors_per_token"] > MAX_VECTORS:
            raise SdfastError(f"num_vectors_per_token must be at most {MAX_VECTORS}, "
                              f"got {o['num_vectors_per_token']}")
        init_tokens(get_tokenizer(), o["init_word"], o["num_vectors_per_token"])

    def check_data(self, data, o):
        super().check_data(data, o)
        tokenizer = get_tokenizer()
        lookup = _lookup(tokenizer, o["token_string"], 1)
        _, slots = place_vectors(tokenizer, lookup, [item.caption for item in data.items], 1)
        if not bool((slots >= 0).any()):
            raise SdfastError(f"{data.config.path}: no caption contains the token_string "
                              f"{o['token_string']!r} (put it in the captions or class_tokens)")

    def setup(self, parts, o, device):
        count = o["num_vectors_per_token"]
        tokenizer = get_tokenizer(pad_id=0 if parts.info.family == "sd2" else None)
        token_embedding = parts.text_encoder.token_embedding
        self.lookup = _lookup(tokenizer, o["token_string"], count)
        self.vectors = nn.Parameter(initial_vectors(tokenizer, token_embedding,
                                                    o["init_word"], count))
        objective = diffusion_objective(parts, o, train_text_encoder=True,
                                        token_vectors=self.vectors)
        groups = [{"params": [self.vectors], "lr": o["learning_rate"]}]
        return objective, groups, [parts.unet, parts.text_encoder]

    def text_inputs(self, tokenizer, captions):
        ids, slots = place_vectors(tokenizer, self.lookup, captions, self.vectors.shape[0])
        return {"input_ids": ids, "slots": slots}

    def saver(self, run, parts, o):
        from ..io.save import save_atomic

        dtype = SAVE_PRECISIONS[o["save_precision"]]

        def save(step):
            vectors = self.vectors.detach().to("cpu", dtype).clone()
            meta = {RUN_ID_KEY: run.run_id, "sdfast.train.method": self.name,
                    "sdfast.train.step": str(step), "sdfast.train.token_string": o["token_string"]}

            def a1111(path, overwrite):
                save_atomic({"emb_params": vectors}, path, metadata=meta, overwrite=overwrite)

            def diffusers(path, overwrite):
                save_atomic({o["token_string"]: vectors}, path, metadata=meta,
                            overwrite=overwrite)
            return run.save_model(step, a1111, diffusers)
        return save


def train_textual_inversion(model, dataset_config, output_dir, output_name, *, token_string,
                            init_word="*", num_vectors_per_token=1, max_train_steps=1600,
                            learning_rate=5e-3, lr_scheduler="constant", lr_warmup_steps=0,
                            optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0,
                            mixed_precision="no", gradient_checkpointing=False,
                            gradient_accumulation_steps=1, save_every_n_steps=None,
                            save_precision="fp32", seed=0, resume=None, noise_offset=0.0,
                            min_snr_gamma=None, min_timestep=0, max_timestep=None,
                            debiased_estimation_loss=False, cache_latents=False, cache_latents_to_disk=False,
                            latents="sample", num_workers=0, cpu=False,
                            progress=True) -> TrainResult:
    """Learn an embedding for `token_string` (which the captions must contain) on the kohya
    dataset config; writes `output_dir/output_name.safetensors` (A1111) and
    `output_name_learned_embeds.safetensors` (diffusers); see the module docstring. The other
    options are `train_finetune`'s (weight decay defaults to 0: it would pull the vectors to 0).
    """
    return run_method(TextualInversion(), dict(locals()))


__all__ = ["train_textual_inversion", "TextualInversion", "place_vectors", "initial_vectors",
           "init_tokens",
           "DIFFUSERS_SUFFIX"]
