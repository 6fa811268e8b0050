"""Shared test fixtures that build reference artefacts from sdfast's shipped data."""
import gzip
import json
from pathlib import Path

import sdfast.text

CLIP_BPE = Path(sdfast.text.__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_dir(out):
    """Write `vocab.json` + `merges.txt` for transformers' CLIPTokenizer from our shipped merge
    list, laying the vocabulary out as OpenAI's simple_tokenizer.py does, with transformers' own
    byte table (so sdfast's vocabulary derivation is checked independently). Returns `out`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(CLIP_BPE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # simple_tokenizer.py keeps these 48894 merges
    alphabet = list(bytes_to_unicode().values())
    tokens = (alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
              + ["<|startoftext|>", "<|endoftext|>"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out
