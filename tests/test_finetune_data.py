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


# ---- lengths, the held-out split and the loader -------------------------------------------------

def random_examples(n: int, seed: int = 0, vocab: int = 64, low: int = 3, high: int = 40) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        start = int(torch.randint(1, length, (1,), generator=g))     # a prompt, then the answer
        out.append(Example(ids, [False] * start + [True] * (length - start)))
    return out


def test_fit_length_truncates_or_drops_and_counts():
    short = Example([1, 2, 3], [False, True, True])
    long = Example(list(range(10)), [False] * 3 + [True] * 7)
    late = Example(list(range(10)), [False] * 8 + [True] * 2)        # its answer is past the cut
    nothing = Example([1, 2], [True, False])                          # only the first token: never predicted
    kept, counts = fit_length([short, long, late, nothing], seq_len=6)
    assert counts == {"kept": 2, "truncated": 1, "dropped": 2}
    assert kept == [short, Example(list(range(6)), [False] * 3 + [True] * 3)]
    kept, counts = fit_length([short, long, late, nothing], seq_len=6, overflow="drop")
    assert kept == [short] and counts == {"kept": 1, "truncated": 0, "dropped": 3}
    with pytest.raises(CamelidError, match="overflow 'cut'"):
        fit_length([short], 6, overflow="cut")


def test_split_heldout_is_deterministic():
    items = list(range(100))
    train, held = split_heldout(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and held == sorted(held)
    assert split_heldout(items, 0.1, seed=3) == (train, held) and split_heldout(items, 0.1, seed=4)[1] != held
    assert split_heldout(items, 0.0, seed=3) == (items, [])
    with pytest.raises(CamelidError, match="val_fraction"):
        split_heldout(items, 1.0, seed=0)


def test_packed_rows_restart_positions_and_ignore_across_examples():
    examples = random_examples(30)
    loader = InstructionLoader(examples, seq_len=64, batch_size=4)
    seen = []
    for row in loader.plan(0):
        assert sum(len(examples[i].ids) for i in row) <= 64
        seen += row
    assert sorted(seen) == list(range(30))                    # every example once per epoch
    b = loader.next_batch()
    assert b.inputs.shape == b.targets.shape == b.positions.shape == b.documents.shape == (4, 64)
    for r, row in enumerate(loader.plan(0)[:4]):
        at = 0
        for d, i in enumerate(row):
            ex, n = examples[i], len(examples[i].ids)
            assert b.inputs[r, at:at + n].tolist() == ex.ids and b.positions[r, at:at + n].tolist() == list(range(n))
            assert (b.documents[r, at:at + n] == d).all()
            want = [ex.ids[k + 1] if ex.trainable[k + 1] else DATA_IGNORE for k in range(n - 1)] + [DATA_IGNORE]
            assert b.targets[r, at:at + n].tolist() == want
            at += n
        assert (b.targets[r, at:] == DATA_IGNORE).all() and (b.documents[r, at:] == len(row)).all()
    assert b.target_tokens() == sum(sum(examples[i].trainable[1:]) for row in loader.plan(0)[:4] for i in row)


def test_unpacked_batches_are_padded_to_a_multiple_of_8_with_similar_lengths():
    examples = random_examples(200, high=60)
    loader = InstructionLoader(examples, seq_len=64, batch_size=8, packing=False)
    spread = []
    for k in range(25):
        b = loader.next_batch()
        lengths = [len(examples[i].ids) for row in loader.plan(0)[8 * k:8 * k + 8] for i in row]
        assert b.positions is None and b.documents is None
        assert b.inputs.shape == (8, min(64, -(-max(lengths) // 8) * 8))
        assert b.target_tokens() == sum(sum(examples[i].trainable[1:]) for row in loader.plan(0)[8 * k:8 * k + 8]
                                        for i in row)
        spread.append(max(lengths) - min(lengths))
    assert loader.epochs() == 1.0
    # sorted within groups of global batches: far less spread than random batches of 8 (about 45)
    assert sum(spread) / len(spread) < 15


def drain(loader, n, rows=None):
    return [loader.next_batch(rows) for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resumes_exactly_and_shares_global_batches_between_ranks(packing):
    examples = random_examples(50)
    a = InstructionLoader(examples, seq_len=64, batch_size=4, seed=5, packing=packing)
    drain(a, 7)                                                   # into the second epoch when packed
    state = a.state_dict()
    after = drain(a, 9)
    b = InstructionLoader(examples, seq_len=64, batch_size=4, seed=5, packing=packing)
    b.load_state_dict(state)
    for x, y in zip(after, drain(b, 9)):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
        if packing:
            assert torch.equal(x.positions, y.positions) and torch.equal(x.documents, y.documents)
    assert a.state_dict() == b.state_dict() and a.epochs() > 1
    # two ranks of 2 rows take the rows one process of 4 takes, the same global batches
    one = InstructionLoader(examples, seq_len=64, batch_size=4, seed=5, packing=packing)
    ranks = [InstructionLoader(examples, seq_len=64, batch_size=2, seed=5, rank=r, world_size=2, packing=packing)
             for r in range(2)]
    for _ in range(5):
        whole = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        for k in range(4):
            part = parts[k % 2]
            real = part.targets[k // 2] != DATA_IGNORE
            assert torch.equal(whole.targets[k][:real.numel()][real], part.targets[k // 2][real])
            assert whole.target_tokens() == sum(p.target_tokens() for p in parts)
    wrong = InstructionLoader(examples[:-1], seq_len=64, batch_size=4)
    with pytest.raises(CamelidError, match="loader state is for 50 examples"):
        wrong.load_state_dict(state)


def test_one_pass_covers_the_data_once_with_as_many_batches_on_every_rank():
    examples = random_examples(11)
    ranks = [InstructionLoader(examples, seq_len=64, batch_size=2, rank=r, world_size=2, shuffle=False, packing=False)
             for r in range(2)]
    passes = [list(r.one_pass()) for r in ranks]
    assert len(passes[0]) == len(passes[1]) == 3
    assert sum(b.target_tokens() for p in passes for b in p) == sum(sum(e.trainable[1:]) for e in examples)


def test_packed_batches_give_the_loss_and_gradients_of_the_examples_one_by_one():
    torch.manual_seed(0)
    examples = random_examples(12, seed=1, high=30)
    model = tiny_model(seed=1)
    batch = next(InstructionLoader(examples, seq_len=64, batch_size=64, shuffle=False).one_pass())
    assert batch.documents.max() > 1                              # several examples share a row

    def loss_of(inputs, targets, positions=None, documents=None):
        h = model.hidden(inputs, positions, documents=documents)
        return linear_cross_entropy(h.flatten(0, 1), model.head_weight, targets.flatten())

    packed = loss_of(batch.inputs, batch.targets, batch.positions, batch.documents)
    packed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    single = InstructionLoader(examples, seq_len=64, batch_size=1, shuffle=False, packing=False)
    one_by_one = sum(loss_of(b.inputs, b.targets) for b in single.one_pass())
    one_by_one.backward()
    assert packed.item() == pytest.approx(one_by_one.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
