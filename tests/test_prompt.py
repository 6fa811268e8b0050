"""parse_prompt_attention against the documented examples of A1111 and ComfyUI.

A1111: the doctest examples of `parse_prompt_attention` in AUTOMATIC1111's
`modules/prompt_parser.py`, verbatim. ComfyUI: the docstring examples of `token_weights` in
`comfy/sd1_clip.py`, verbatim. The remaining cases are derived by hand from reading those
functions; each says which rule it checks. Weights are compared with pytest.approx (A1111's
docstring prints products such as 1.5730000000000004; any float64 ordering is within 1e-12).
"""
import pytest

from sdfast.text import parse_prompt_attention


def approx_pairs(pairs):
    return [[text, pytest.approx(weight, rel=1e-12)] for text, weight in pairs]


# (input, expected) verbatim from A1111's `parse_prompt_attention` docstring.
A1111_DOC_EXAMPLES = [
    ('normal text', [['normal text', 1.0]]),
    ('an (important) word', [['an ', 1.0], ['important', 1.1], [' word', 1.0]]),
    ('(unbalanced', [['unbalanced', 1.1]]),
    ('\\(literal\\]', [['(literal]', 1.0]]),
    ('(unnecessary)(parens)', [['unnecessaryparens', 1.1]]),
    ('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
     [['a ', 1.0],
      ['house', 1.5730000000000004],
      [' ', 1.1],
      ['on', 1.0],
      [' a ', 1.1],
      ['hill', 0.55],
      [', sun, ', 1.1],
      ['sky', 1.4641000000000006],
      ['.', 1.1]]),
]


@pytest.mark.parametrize("text,expected", A1111_DOC_EXAMPLES)
def test_a1111_documented_examples(text, expected):
    got = parse_prompt_attention(text)
    assert got == approx_pairs(expected)
    assert parse_prompt_attention(text, syntax="a1111") == got


# Derived from A1111's lexer and bracket stacks.
A1111_RULES = [
    ("", [["", 1.0]]),                                        # empty prompt
    ("[a]", [["a", 1 / 1.1]]),                                # square divides by 1.1
    ("[[a]]", [["a", 1 / 1.1 / 1.1]]),
    ("[unbalanced", [["unbalanced", 1 / 1.1]]),               # closed at the end
    ("((a:1.5))", [["a", 1.5 * 1.1]]),                        # explicit weight multiplies
    ("(a: 1.5 ) b", [["a", 1.5], [" b", 1.0]]),               # spaces around the number
    ("(a:-0.5)", [["a", -0.5]]),
    ("a:1.5) b]", [["a:1.5) b]", 1.0]]),                      # closers without openers
    ("a \\\\ b", [["a \\ b", 1.0]]),                          # \\ is a literal backslash
    ("a\\nb", [["anb", 1.0]]),                                # a lone backslash is dropped
    ("a (b \\(c\\)) d", [["a ", 1.0], ["b (c)", 1.1], [" d", 1.0]]),  # escapes get weighted
    ("time: 5", [["time: 5", 1.0]]),                          # a colon outside a group is text
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),  # spaces around BREAK consumed
    ("BREAK a", [["", 1.0], ["BREAK", -1], ["a", 1.0]]),
    ("a break b", [["a break b", 1.0]]),                      # only upper case BREAK
    ("aBREAK b", [["aBREAK b", 1.0]]),                        # BREAK must be a whole word
    ("(a) BREAK (b)", [["a", 1.1], ["", 1.0], ["BREAK", -1], ["", 1.0], ["b", 1.1]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),  # inside a group: weighted
]


@pytest.mark.parametrize("text,expected", A1111_RULES)
def test_a1111_rules(text, expected):
    assert parse_prompt_attention(text) == approx_pairs(expected)


def test_a1111_invalid_weight():
    # A1111's lexer accepts "1.2.3" as a number and then float() fails on it.
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# (input, expected) verbatim from the `token_weights` docstring in ComfyUI's sd1_clip.py.
COMFY_DOC_EXAMPLES = [
    ("(foo)", [('foo', 1.1)]),
    ("(foo)(bar)", [('foo', 1.1), ('bar', 1.1)]),
    ("(foo:2.0)", [('foo', 2.0)]),
    ("((foo))", [('foo', 1.21)]),
    ("((foo):1.1)", [('foo', 1.21)]),
    ("((foo:1.1))", [('foo', 1.1)]),
    ("(foo:0.0)", [('foo', 0.0)]),
    ("((foo:1.0):0.0)", [('foo', 1.0)]),
    ("foo ((((lol (cat:666) attack:100)))) baz",
     [('foo ', 1.0), ('lol ', 100.0), ('cat', 666.0), (' attack', 100.0), (' baz', 1.0)]),
    ("foo ((((lol (cat:666) attack):100))) baz",
     [('foo ', 1.0), ('lol ', 110.0), ('cat', 666.0), (' attack', 110.0), (' baz', 1.0)]),
]


@pytest.mark.parametrize("text,expected", COMFY_DOC_EXAMPLES)
def test_comfy_documented_examples(text, expected):
    assert parse_prompt_attention(text, syntax="comfy") == approx_pairs(expected)


# Derived from ComfyUI's parse_parentheses / token_weights / escape_important.
COMFY_RULES = [
    ("", []),                                                  # nothing to weight
    ("plain text", [("plain text", 1.0)]),
    ("[x] (y)", [("[x] ", 1.0), ("y", 1.1)]),                  # square brackets are text
    ("\\(a\\) (b)", [("(a) ", 1.0), ("b", 1.1)]),               # escaped parentheses
    ("\\[a\\]", [("\\[a\\]", 1.0)]),                           # only ( and ) escape
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),                         # last colon holds the weight
    ("(:1.3)", [(":1.3", 1.1)]),                               # colon at index 0: no weight
    ("(a:abc)", [("a:abc", 1.1)]),                             # not a number: x1.1, text kept
    ("(a: 1.5 )", [("a", 1.5)]),                               # float() strips spaces
    ("(a:1e1)", [("a", 10.0)]),                                # float() syntax
    ("(a", [("(a", 1.0)]),                                     # unclosed: text
    ("a) (b", [("a) (b", 1.0)]),                               # stray ")" then "(": text
    ("(a))(b)", [("a", 1.1), (")(b)", 1.0)]),
    ("()", []),
    ("a BREAK b", [("a BREAK b", 1.0)]),                       # no BREAK in ComfyUI
    ("embedding:foo, (embedding:bar:1.2)",                     # embeddings stay in the text
     [("embedding:foo, ", 1.0), ("embedding:bar", 1.2)]),
]


@pytest.mark.parametrize("text,expected", COMFY_RULES)
def test_comfy_rules(text, expected):
    assert parse_prompt_attention(text, syntax="comfy") == approx_pairs(expected)


def test_unknown_syntax():
    with pytest.raises(ValueError, match="a1111.*comfy"):
        parse_prompt_attention("x", syntax="nai")


def test_module_docstring_examples():
    import doctest

    import sdfast.text.prompt
    result = doctest.testmod(sdfast.text.prompt)
    assert result.attempted > 0 and result.failed == 0
