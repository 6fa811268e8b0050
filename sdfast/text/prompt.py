"""Prompt emphasis syntax: A1111's and ComfyUI's dialects, parsed into `[text, weight]` pairs.

"a1111" follows `parse_prompt_attention` in AUTOMATIC1111's `modules/prompt_parser.py`:
  (x)      x1.1, nesting multiplies         [x]      /1.1
  (x:1.3)  x1.3 (multiplies too)            \\( \\) \\[ \\] \\\\   literal characters
  unclosed brackets are closed at the end   BREAK (upper case word) -> ["BREAK", -1]
  neighbours of equal weight are merged     "" -> [["", 1.0]]
  Weights are multiplied in the same order as A1111 (a range at its closing bracket, inner
  first, unclosed round brackets before unclosed square ones), so the floats and the merging
  of equal-weight runs come out bit-identical. A lone backslash is dropped, as there.

"comfy" follows `token_weights` / `parse_parentheses` / `escape_important` in ComfyUI's
`comfy/sd1_clip.py`:
  (x)      x1.1 of the enclosing weight     (x:1.3)  exactly 1.3, replacing the enclosing weight
  [x]      plain text                       \\( \\)    literal parentheses (nothing else escapes)
  The weight is whatever Python's float() accepts after the last ':' of the group (else the
  group is x1.1 and keeps the colon text). Unbalanced parentheses stay as text. No merging,
  no BREAK. `embedding:name` is kept in the text; the chunker recognises it (chunks.py).
"""
from __future__ import annotations

import math
import re

from ..errors import SdfastError

SYNTAXES = ("a1111", "comfy")

ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1

# One A1111 lexeme per match. Group 1 is the number of an explicit "...:w)" closing.
_A1111_LEXEME = re.compile(r"""
    \\[()\[\]\\]?                   # escape: \( \) \[ \] \\ , or a lone backslash
  | \( | \[                         # openers
  | :\s*([+-]?[.\d]+)\s*\)          # ":1.3)" closes a round bracket with an explicit weight
  | \) | \]                         # closers
  | [^\\()\[\]:]+                   # plain text
  | :                               # a colon that starts no weight
""", re.X)

_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str, syntax: str = "a1111") -> list[list]:
    """Split a prompt into `[text, weight]` pairs in the chosen dialect (see module docstring).

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    >>> parse_prompt_attention('(a:1.5) (b) [c]', syntax='comfy')
    [['a', 1.5], [' ', 1.0], ['b', 1.1], [' [c]', 1.0]]
    """
    if syntax == "a1111":
        pieces = _parse_a1111(text)
    elif syntax == "comfy":
        pieces = [[t, w] for t, w in _comfy_weights(_comfy_lex(text), 1.0)]
    else:
        raise ValueError(f"unknown prompt syntax {syntax!r}; valid: {', '.join(SYNTAXES)}")
    for piece, weight in pieces:
        if not math.isfinite(weight):   # nan / inf (or an overflowing product): NaN images
            raise SdfastError(f"prompt: the emphasis weight of {piece.strip()!r} is {weight} "
                              "(weights must be finite numbers)")
    return pieces


def _parse_a1111(text: str) -> list[list]:
    """A1111's emphasis parse: a flat list of pieces whose weights brackets multiply in ranges."""
    pieces: list[list] = []
    round_open: list[int] = []   # index into `pieces` where each open "(" starts
    square_open: list[int] = []

    def scale_from(start: int, mult: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= mult

    for m in _A1111_LEXEME.finditer(text):
        lexeme, weight = m.group(0), m.group(1)
        if lexeme.startswith("\\"):
            pieces.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            round_open.append(len(pieces))
        elif lexeme == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), _a1111_number(weight))
        elif lexeme == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULT)
        elif lexeme == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULT)
        else:
            for i, part in enumerate(_A1111_BREAK.split(lexeme)):
                if i > 0:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])

    for start in round_open:
        scale_from(start, ROUND_MULT)
    for start in square_open:
        scale_from(start, SQUARE_MULT)
    if not pieces:
        return [["", 1.0]]
    return _merge_equal_runs(pieces)


def _a1111_number(weight: str) -> float:
    """The explicit weight of "(x:w)"; A1111's lexer admits strings such as "1.2.3"."""
    try:
        return float(weight)
    except ValueError:
        raise SdfastError(f"prompt: invalid emphasis weight {weight!r} (a number, as in "
                          "'(word:1.2)')") from None


def _merge_equal_runs(pieces: list[list]) -> list[list]:
    """Join neighbours whose weights compare equal (A1111 does this after weighting)."""
    out = [pieces[0]]
    for text, weight in pieces[1:]:
        if out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return out


# ComfyUI lexing: an escaped parenthesis is a literal one-character string; structural
# parentheses are the two sentinels below, so no text can ever be mistaken for them.
_OPEN, _CLOSE = object(), object()


def _comfy_lex(text: str) -> list:
    atoms: list = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and text[i + 1:i + 2] in ("(", ")"):
            atoms.append(text[i + 1])  # \( and \) are literal
            i += 2
            continue
        atoms.append(_OPEN if c == "(" else _CLOSE if c == ")" else c)
        i += 1
    return atoms


def _render(atoms: list) -> str:
    return "".join("(" if a is _OPEN else ")" if a is _CLOSE else a for a in atoms)


def _comfy_top_level(atoms: list) -> list[list]:
    """Split into top-level "( ... )" groups and the text between them (`parse_parentheses`).

    The depth counter may go negative on a stray ")", after which "(" no longer opens a group:
    that is ComfyUI's behaviour and decides what stays literal text.
    """
    groups: list[list] = []
    current: list = []
    depth = 0
    for a in atoms:
        if a is _OPEN:
            if depth == 0:
                if current:
                    groups.append(current)
                current = [a]
            else:
                current.append(a)
            depth += 1
        elif a is _CLOSE:
            depth -= 1
            if depth == 0:
                groups.append(current + [a])
                current = []
            else:
                current.append(a)
        else:
            current.append(a)
    if current:
        groups.append(current)
    return groups


def _comfy_weights(atoms: list, weight: float) -> list[tuple[str, float]]:
    """ComfyUI's `token_weights`: an explicit weight replaces, a bare group multiplies by 1.1."""
    out: list[tuple[str, float]] = []
    for group in _comfy_top_level(atoms):
        if len(group) >= 2 and group[0] is _OPEN and group[-1] is _CLOSE:
            inner = group[1:-1]
            inner_weight = weight * ROUND_MULT
            colon = max((i for i, a in enumerate(inner) if a == ":"), default=-1)
            if colon > 0:
                try:
                    inner_weight = float(_render(inner[colon + 1:]))
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _comfy_weights(inner, inner_weight)
        else:
            out.append((_render(group), weight))
    return out
