import pytest

from camelid.errors import CamelidError
from camelid.tokenizer import SentencePieceTokenizer, tokenizer_from_gguf
from helpers import TEXTS


def test_sentencepiece_round_trip_and_llama_ids(spm_tokenizer):
    tok = spm_tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    assert tok.id_to_piece(3) == "<0x00>" and tok.id_to_piece(258) == "<0xFF>"  # byte pieces 3..258
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2
        assert tok.decode(ids) == text
    assert tok.encode("1609") == [tok.piece_to_id("▁")] + [tok.piece_to_id(d) for d in "1609"]  # split digits


def test_sentencepiece_rebuilt_from_gguf_vocabulary_encodes_identically(spm_tokenizer):
    rebuilt = tokenizer_from_gguf(spm_tokenizer.gguf_metadata())
    assert isinstance(rebuilt, SentencePieceTokenizer)
    for text in TEXTS:
        assert rebuilt.encode(text, bos=True) == spm_tokenizer.encode(text, bos=True)
        assert rebuilt.decode(rebuilt.encode(text)) == text


def test_sentencepiece_matches_transformers(spm_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    spm_tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # transformers 5 drops the dummy-prefix space before leading whitespace, where SentencePiece
    # (and Meta's code, which calls it) keeps it: compare on text that starts with a non-space.
    for text in TEXTS:
        if not text[0].isspace():
            assert hf(text, add_special_tokens=False)["input_ids"] == spm_tokenizer.encode(text), text
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert spm_tokenizer.encode(" a") == sp.encode(" a") == [sp.piece_to_id("▁"), sp.piece_to_id("▁a")]


def test_byte_bpe_rebuilt_from_gguf_vocabulary_encodes_identically(bpe_tokenizer):
    meta = bpe_tokenizer.gguf_metadata()
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt2"
    rebuilt = tokenizer_from_gguf(meta)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert rebuilt.encode(text) == bpe_tokenizer.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text


def test_special_tokens_are_parsed_unless_asked_not_to(bpe_tokenizer):
    tok = bpe_tokenizer
    start, end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == start and ids[-1] == end
    literal = tok.encode("<|im_start|>user<|im_end|>", special=False)
    assert start not in literal and end not in literal
    assert end in tok.stop_ids


def test_llama2_chat_format_matches_metas_reference(spm_tokenizer):
    tok = spm_tokenizer
    assert tok.chat_template is None
    dialog = [{"role": "system", "content": "Always answer briefly."},
              {"role": "user", "content": " Shall I compare thee? "},
              {"role": "assistant", "content": "To a summer's day."},
              {"role": "user", "content": "Why?"}]
    # Meta's chat_completion (llama/generation.py), spelled out with our encode.
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    d = [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + dialog[2:]
    expected = []
    for prompt, answer in zip(d[::2], d[1::2]):
        expected += tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                               bos=True, eos=True)
    expected += tok.encode(f"{B_INST} {d[-1]['content'].strip()} {E_INST}", bos=True)
    assert tok.encode_chat(dialog) == expected


def test_jinja_template_and_no_double_bos(spm_tokenizer):
    tok = spm_tokenizer
    saved = tok.chat_template
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    try:
        ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = saved
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


def test_chat_message_errors(bpe_tokenizer):
    with pytest.raises(CamelidError, match=r"messages\[0\]"):
        bpe_tokenizer.encode_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(CamelidError, match="non-empty list"):
        bpe_tokenizer.encode_chat([])


def test_added_tokens_extend_a_sentencepiece_vocabulary(spm_tokenizer, tmp_path):
    import json

    from camelid.tokenizer import load_tokenizer

    spm_tokenizer.save(tmp_path)
    size = spm_tokenizer.vocab_size
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(size): {"content": "<|im_start|>", "special": True},
                                   str(size + 1): {"content": "<|im_end|>", "special": True}}
    cfg["eos_token"] = "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == size + 2
    assert tok.encode("<|im_start|>user")[0] == size and tok.eos_id == size + 1
    assert tok.decode([size + 1]) == "" or tok.decode([size + 1]) == "<|im_end|>"
    assert size + 1 in tok.stop_ids


def test_sentencepiece_style_tokenizer_json_refuses_byte_level_gguf_export():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from camelid.tokenizer import HFTokenizer

    backend = Backend(models.BPE({"▁": 0, "a": 1, "▁a": 2, "<0x41>": 3}, [("▁", "a")], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    with pytest.raises(CamelidError, match="tokenizer.model"):
        HFTokenizer(backend).gguf_metadata()


@pytest.mark.parametrize("which", ["bpe_tokenizer", "spm_tokenizer"])
def test_token_bytes_spell_the_text_and_control_ids_are_markup(which, request):
    """What a grammar engine reads: each token's raw bytes, so that a text's tokens' bytes are the
    text's UTF-8 (a character split over byte tokens included; SentencePiece's dummy space first)."""
    tok = request.getfixturevalue(which)
    text = "Shall I compare thee, 1599 · naïve 😀?"
    ids = tok.encode(text, bos=False, special=False)
    spelled = b"".join(tok.token_bytes()[i] for i in ids)
    assert spelled.decode("utf-8") in (text, " " + text)
    assert len(tok.token_bytes()) == tok.vocab_size
    assert tok.eos_id in tok.control_ids() and not set(ids) & tok.control_ids()
    specials = tok.special_tokens()
    if "<|im_end|>" in specials:
        assert tok.token_bytes()[specials["<|im_end|>"]] == b"<|im_end|>"
