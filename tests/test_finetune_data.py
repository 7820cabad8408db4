"""Instruction data (camelid.finetune.data), the model's packed-documents mask and the loss's
ignore index (issue 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camelid.config import get_size
from camelid.model.transformer import Transformer
from camelid.train.loss import IGNORE, linear_cross_entropy


def tiny_model(seed: int = 0, vocab: int = 64) -> Transformer:
    from dataclasses import replace

    model = Transformer(replace(get_size("tiny"), vocab_size=vocab, max_seq_len=128))
    model.init_weights(seed=seed)
    return model


# ---- the model's documents mask and the loss's ignore index --------------------------------------

def test_documents_mask_isolates_packed_examples():
    model = tiny_model()
    torch.manual_seed(0)
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    documents = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        h = model.hidden(packed, positions, documents=documents)
        torch.testing.assert_close(h[:, :5], model.hidden(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[:, 5:], model.hidden(b), atol=1e-5, rtol=1e-5)
        # one document over the whole row is the plain causal forward
        torch.testing.assert_close(model(packed, documents=torch.zeros_like(packed)), model(packed),
                                   atol=1e-5, rtol=1e-5)


def test_documents_need_the_tokens_shape_and_no_cache():
    model = tiny_model()
    with pytest.raises(ValueError, match="documents"):
        model.hidden(torch.zeros(1, 4, dtype=torch.long), documents=torch.zeros(1, 3, dtype=torch.long))


def test_loss_skips_ignored_targets():
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    t[::3] = IGNORE
    ours = linear_cross_entropy(h, w, t, chunk=7)
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(F.linear(h, w), t, reduction="sum", ignore_index=IGNORE)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)
    assert gh[::3].abs().max() == 0


def test_loss_of_only_ignored_targets_is_zero_with_zero_gradients():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((6,), IGNORE))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


# ---- records: formats and errors ------------------------------------------------------------------

import json  # noqa: E402

from camelid.errors import CamelidError  # noqa: E402
from camelid.finetune.data import (IGNORE as DATA_IGNORE, Example, InstructionLoader, encode_conversation,  # noqa: E402
                                   fit_length, load_hf_dataset, read_records, split_heldout)

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_the_three_formats_become_conversations(tmp_path):
    assert read_records(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONV}])) == [CONV]
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 2", "output": "4"},
                                                     {"instruction": "Say hi.", "output": "hi"}])
    assert read_records(alpaca) == [
        [{"role": "user", "content": "Add.\n\n2 2"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]]
    pc = write_jsonl(tmp_path / "pc.json", [{"prompt": "Q?", "completion": "A."},
                                            {"prompt": CONV[:2], "completion": CONV[2:3]}])
    assert read_records(pc) == [[{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], CONV[:3]]
    assert read_records(pc, fmt="prompt_completion") == read_records(pc)


def test_parquet_and_the_hugging_face_loader(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": CONV}, {"messages": CONV[1:3]}]), tmp_path / "d.parquet")
    assert read_records(tmp_path / "d.parquet") == [CONV, CONV[1:3]]
    pq.write_table(pa.Table.from_pylist([{"messages": CONV[:2]}]), tmp_path / "bad.parquet")
    with pytest.raises(CamelidError, match=r"bad\.parquet:row 1: .*no assistant turn"):
        read_records(tmp_path / "bad.parquet")
    pytest.importorskip("datasets")
    d = tmp_path / "hf"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}, {"messages": CONV}])
    with pytest.raises(CamelidError, match=r"train\].* row 2: no 'instruction'"):
        load_hf_dataset(str(d))   # mixed formats: every record has the first one's
    write_jsonl(d / "train.jsonl", [{"instruction": "Say hi.", "output": "hi"}] * 3)
    assert load_hf_dataset(str(d), split="train") == [[{"role": "user", "content": "Say hi."},
                                                        {"role": "assistant", "content": "hi"}]] * 3


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "unknown role 'human'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
     r"message 0 \(user\) has empty content"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with an assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     r"message 1 \(assistant\) has empty content"),
    ({"instruction": "Say hi.", "output": "hi"}, "no 'messages' field: an alpaca record in chat data"),
    ({"text": "plain"}, "no known format"),
    ("[1, 2]", "expected a JSON object"),
    ("not json at all", "not valid JSON"),
])
def test_bad_records_name_the_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, "", record])
    with pytest.raises(CamelidError, match=rf"d\.jsonl:3: .*{message}"):
        read_records(path)


def test_a_file_that_is_not_jsonl_nor_parquet(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,output\nSay hi,hi\n")
    with pytest.raises(CamelidError, match=r"d\.csv:1: not valid JSON .*JSONL .* or Parquet"):
        read_records(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_text("PAR1 but not really")
    with pytest.raises(CamelidError, match=r"d\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "d.parquet")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(CamelidError, match="no records"):
        read_records(tmp_path / "e.jsonl")
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "x", "output": " "}])
    with pytest.raises(CamelidError, match=r"a\.jsonl:2: 'output' is empty"):
        read_records(tmp_path / "a.jsonl")
    with pytest.raises(CamelidError, match="format 'sharegpt'"):
        read_records(tmp_path / "e.jsonl", fmt="sharegpt")


# ---- rendering and the loss mask ----------------------------------------------------------------

def runs(example):
    """The trainable tokens as maximal runs [(start, end)]."""
    out, start = [], None
    for i, t in enumerate(example.trainable + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.real_model
def test_loss_mask_with_smollm2_chatml_template(smollm2):
    tok = smollm2.tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ex = encode_conversation(CONV, tok)
    # by hand: ChatML segments split at special tokens tokenize on their own
    segments = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                 "<|im_start|>assistant\n", False), ("Hello!<|im_end|>", True),
                ("\n<|im_start|>user\nTwo plus two?<|im_end|>\n<|im_start|>assistant\n", False),
                ("Four.<|im_end|>", True), ("\n", False)]
    ids, trainable = [], []
    for text, learn in segments:
        piece = tok.encode(text)
        ids += piece
        trainable += [learn] * len(piece)
    assert ex.ids == ids == tok.encode_chat(CONV, add_generation_prompt=False)
    assert ex.trainable == trainable
    assert encode_conversation(CONV, tok, train_on="all").trainable == [True] * len(ids)


def test_loss_mask_with_sentencepiece_llama2_format(spm_tokenizer):
    tok = spm_tokenizer
    assert tok.chat_template is None
    text = tok.apply_chat_template(CONV, add_generation_prompt=False)
    assert text == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
                    "<s>[INST] Two plus two? [/INST] Four. </s>")
    ex = encode_conversation(CONV, tok)
    assert ex.ids == tok.encode_chat(CONV, add_generation_prompt=False) and ex.ids.count(tok.bos_id) == 2
    (a, b), (c, d) = runs(ex)
    # each answer is " answer </s>" right after "[/INST]", nothing else is learned
    assert tok.decode(ex.ids[:a]).endswith("Hi there [/INST]") and tok.decode(ex.ids[:c]).endswith("two? [/INST]")
    assert ex.ids[b - 1] == ex.ids[d - 1] == tok.eos_id and d == len(ex.ids)
    assert tok.decode(ex.ids[a:b - 1]).strip() == "Hello!" and tok.decode(ex.ids[c:d - 1]).strip() == "Four."
    # chat rendering is unchanged: the conversation must still end with the user when prompting
    with pytest.raises(CamelidError, match="last message must come from the user"):
        tok.apply_chat_template(CONV, add_generation_prompt=True)
    assert tok.apply_chat_template(CONV[:4]).endswith("</s><s>[INST] Two plus two? [/INST]")


def test_a_template_that_rewrites_earlier_turns_is_refused(bpe_tokenizer):
    import copy

    tok = copy.copy(bpe_tokenizer)
    # drops earlier assistant turns unless it is rendering the final answer (as reasoning templates do)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>"
                         "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(CamelidError, match="the model's chat template does not render .*train_on"):
        encode_conversation(CONV, tok)


def test_loss_equals_a_hand_computation_over_assistant_tokens(bpe_tokenizer):
    ex = encode_conversation(CONV, bpe_tokenizer)
    model = tiny_model(vocab=bpe_tokenizer.vocab_size)
    batch = InstructionLoader([ex], seq_len=128, batch_size=1, packing=False).next_batch()
    loss = linear_cross_entropy(model.hidden(batch.inputs).flatten(0, 1), model.head_weight, batch.targets.flatten())
    logp = torch.log_softmax(model(torch.tensor([ex.ids]))[0].double(), dim=-1)
    hand = -sum(logp[i - 1, ex.ids[i]] for i in range(1, len(ex.ids)) if ex.trainable[i])
    assert batch.target_tokens() == sum(ex.trainable) == len(bpe_tokenizer.encode("Hello!<|im_end|>Four.<|im_end|>"))
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
