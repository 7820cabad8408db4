"""Any text at all, valid Unicode or not, gives a clean result or a CamelidError: never another
exception (issue 12). Invalid text follows the project's rule: lone surrogates (undecodable bytes
under surrogateescape, JSON's "\\ud800") become U+FFFD, as bytes.decode("utf-8", "replace") does."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from camelid.errors import CamelidError
from camelid.generate import LLM
from camelid.tokenizer import has_invalid, replace_invalid
from camelid.tokenizer.chat import ROLES
from test_model import tiny

# Characters that break things: lone surrogates (escaped bytes and not), NUL and controls,
# combining marks, emoji and other astral characters, right-to-left text and overrides,
# SentencePiece's own space mark, the replacement character, whitespace, chat markup.
TRICKY = ["\ud800", "\udbff", "\udc00", "\udc80", "\udcff", "\udfff", "\x00", "\x07", "\x1b", "\x7f", "\u0301",
          "e\u0301", "\u200d", "\ufeff", "\U0001f999", "\U0001f469\u200d\U0001f4bb", "\u202e",
          "\u05e9\u05dc\u05d5\u05dd", "\u0627\u0644\u0633\u0644\u0627\u0645", "\u2581", "\ufffd", "\n", "\r\n", "\t",
          " ", "  ", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]", "{{", "}}", "{%",
          "\U0010ffff", "\uffff"]

characters = st.one_of(st.characters(exclude_categories=()), st.sampled_from(TRICKY))
texts = st.one_of(
    st.lists(characters, max_size=40).map("".join),
    st.tuples(st.lists(characters, min_size=1, max_size=4).map("".join), st.integers(50, 400)).map(
        lambda t: t[0] * t[1]),                                                  # long runs
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")),  # bytes as argv / stdin give them
)
FAST = settings(max_examples=50, deadline=None)


@FAST
@given(st.binary(max_size=80))
def test_undecodable_bytes_become_what_decoding_with_replace_gives(data):
    assert replace_invalid(data.decode("utf-8", "surrogateescape")) == data.decode("utf-8", "replace")


@FAST
@given(texts)
def test_replace_invalid_gives_valid_text_and_keeps_valid_text(text):
    clean = replace_invalid(text)
    clean.encode("utf-8")                              # encodable: no surrogate is left
    assert not has_invalid(clean) and replace_invalid(clean) == clean
    assert (clean == text) == (not has_invalid(text))
    assert clean.replace("\ufffd", "") == "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF).replace(
        "\ufffd", "")                                  # only the bad parts changed


@FAST
@given(texts)
@example("\udcff\udcfeShall I\ud800")
def test_byte_level_bpe_encodes_anything_and_is_lossless(bpe_tokenizer, text):
    tok = bpe_tokenizer
    for special in (True, False):
        ids = tok.encode(text, special=special)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == replace_invalid(text)  # byte-level BPE keeps every byte, markup too


@FAST
@given(texts)
@example("\udcff\udcfeShall I\ud800")
def test_sentencepiece_encodes_anything_and_is_lossless_but_for_its_space_mark(spm_tokenizer, text):
    tok = spm_tokenizer
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    # byte fallback keeps every character; SentencePiece writes spaces as U+2581 and reads every
    # U+2581 back as a space, and with special=True "<s>" and "</s>" become BOS and EOS, whose
    # text is empty when decoded
    plain = tok.encode(text, special=False)
    assert tok.decode(plain) == replace_invalid(text).replace("\u2581", " ")


any_messages = st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(ROLES), texts),
    "content": st.one_of(texts, st.none(), st.integers()),
}), max_size=5)


def _alternating(pairs):   # what a chat sends: user, reply, user, ..., user
    return [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})][:-1]


turns = st.lists(st.tuples(texts, texts), min_size=1, max_size=3).map(_alternating)
messages = st.one_of(any_messages, turns, st.tuples(texts, turns).map(
    lambda t: [{"role": "system", "content": t[0]}] + t[1]))


@FAST
@given(messages, st.booleans())
@example([{"role": "system", "content": "\udcff"}, {"role": "user", "content": "\ud800 hi"}], True)
def test_chat_templates_render_any_messages_or_say_why_not(spm_tokenizer, bpe_tokenizer, msgs, add_generation_prompt):
    for tok in (bpe_tokenizer, spm_tokenizer):   # a Jinja template (ChatML), and Llama-2's built-in format
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt)
            ids = tok.encode_chat(msgs, add_generation_prompt)
        except CamelidError as e:
            assert str(e).startswith(("chat messages", "chat template"))
            continue
        assert not has_invalid(text) and all(0 <= i < tok.vocab_size for i in ids)
        for m in msgs:
            assert m["role"] in ROLES and isinstance(m["content"], str)


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    return LLM(tiny("tiny"), bpe_tokenizer, compile=False)


# generation runs a model per example: a few examples are enough, each a few tokens
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.one_of(st.just(0.0), st.floats(allow_nan=True, allow_infinity=True)),
       st.one_of(st.just(1.0), st.floats(allow_nan=True, allow_infinity=True)))
@example("\udcff\udcfeShall I\ud800", 0.0, 1.0)
@example("Shall I", 1e-80, 1.0)
@example("0\x80\x80" * 50, 0.0, 1.0)   # fits generate's context, not the chat template's
def test_generate_from_any_prompt_and_settings(tiny_llm, prompt, temperature, top_p):
    try:
        out = tiny_llm.generate(prompt, max_new_tokens=3, temperature=temperature, top_p=top_p, seed=0)
    except CamelidError as e:
        assert any(word in str(e) for word in ("temperature", "top_p", "prompt"))
        return
    assert isinstance(out, str) and not has_invalid(out)
    try:
        reply = tiny_llm.chat([{"role": "user", "content": prompt}], max_new_tokens=2)
    except CamelidError as e:  # the chat template's tokens may take a prompt that fitted past the context
        assert "context" in str(e)
        return
    assert isinstance(reply, str) and not has_invalid(reply)
