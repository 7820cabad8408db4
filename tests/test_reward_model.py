"""Reward models as models (issue 14): scorers in camelid's and Hugging Face's formats (parity with
transformers' LlamaForSequenceClassification both ways, on padded batches), refused by GGUF and
Meta's format; RewardModel's scores; same_tokenizer; `camelid reward`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import camelid
from camelid.align.reward_model import RewardModel, same_tokenizer, tokenizer_difference
from camelid.atomic import atomic_dir
from camelid.checkpoint import build_model, convert, read_checkpoint
from camelid.checkpoint.native import write_native
from camelid.cli.info import describe
from camelid.cli.main import main
from camelid.config import ModelConfig
from camelid.errors import CamelidError
from camelid.finetune.data import encode_conversation
from camelid.model import Transformer
from camelid.plan.training import Layout, sharded_params
from helpers import cli_error, random_hf_llama, train_byte_bpe

CONVERSATION = [{"role": "user", "content": "Shall I compare thee?"},
                {"role": "assistant", "content": "Thou art more lovely"}]


def scorer_config(tokenizer, num_labels: int = 1, kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=tokenizer.vocab_size,
                       hidden_dim=176, norm_eps=1e-5, max_seq_len=64, num_labels=num_labels)


def native_scorer(directory: Path, tokenizer, seed: int = 0, **kwargs) -> Transformer:
    """A random camelid scorer written as a camelid checkpoint; norms and the head drawn wide
    enough that a wrong weight or a wrong position changes the scores visibly."""
    model = Transformer(scorer_config(tokenizer, **kwargs))
    model.init_weights(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        model.output.weight.normal_(0, 1, generator=g)
    with atomic_dir(directory) as tmp:
        write_native(tmp, model.config, tokenizer, model.state_dict().items())
    return model.eval()


def hf_scorer(directory: Path, tokenizer, tied: bool = False, kv_heads: int = 2, seed: int = 0):
    """A random transformers LlamaForSequenceClassification, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, num_labels=1, pad_token_id=tokenizer.eos_id,
                      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        model.score.weight.normal_(0, 1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model


def padded_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as a transformers user would batch them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def random_rows(vocab: int, lengths=(5, 17, 1, 30, 9), seed: int = 0) -> list[list[int]]:
    """Rows of different lengths, of ordinary tokens (ids 3.. are neither padding nor special)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("rm") / "native"
    native_scorer(d, bpe_tokenizer)
    return d


# ---- formats ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 4)])
def test_a_transformers_scorer_loads_with_the_same_scores(tmp_path, bpe_tokenizer, tied, kv_heads):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    ref = hf_scorer(tmp_path / "hf", bpe_tokenizer, tied=tied, kv_heads=kv_heads)
    rm = RewardModel.load(tmp_path / "hf")
    # a classifier from a tied base keeps tie_word_embeddings in its config; its score head is its own
    assert rm.config.num_labels == 1 and not rm.config.tie_embeddings
    rows = random_rows(bpe_tokenizer.vocab_size)
    ids, mask = padded_batch(rows, pad=bpe_tokenizer.eos_id)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(rm.score_tokens(rows, batch_size=2), expected, atol=1e-4, rtol=1e-4)
    assert expected.std() > 0.1  # the scores differ from row to row: the test can see a wrong position


def test_a_config_without_labels_takes_them_from_the_score_head(tmp_path, bpe_tokenizer):
    pytest.importorskip("transformers")
    hf_scorer(tmp_path / "hf", bpe_tokenizer)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["id2label"], cfg["label2id"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert read_checkpoint(tmp_path / "hf").config.num_labels == 1


def test_a_camelid_scorer_exports_to_transformers_with_the_same_scores(tmp_path, bpe_tokenizer):
    transformers = pytest.importorskip("transformers")
    model = native_scorer(tmp_path / "native", bpe_tokenizer, seed=3)
    convert(tmp_path / "native", tmp_path / "hf", to="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0}
    assert cfg["pad_token_id"] == bpe_tokenizer.eos_id and not cfg["tie_word_embeddings"]
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["score.weight"].shape == (1, 64) and "lm_head.weight" not in weights
    assert not (tmp_path / "hf" / "generation_config.json").exists()

    ref = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == "LlamaForSequenceClassification" and ref.config.num_labels == 1
    rows = random_rows(bpe_tokenizer.vocab_size, seed=1)
    ids, mask = padded_batch(rows, pad=ref.config.pad_token_id)  # the pad id the export wrote
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = torch.stack([model.head(model.hidden(torch.tensor([r]))[0, -1])[0] for r in rows])
    torch.testing.assert_close(RewardModel.load(tmp_path / "native").score_tokens(rows), expected,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # and back: camelid -> hf -> camelid is bit-exact
    convert(tmp_path / "hf", tmp_path / "back", to="camelid")
    a, b = load_file(tmp_path / "native" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(tmp_path / "back").config == model.config


def test_a_scorer_round_trips_the_native_format_and_info_counts_its_head(scorer_dir, bpe_tokenizer):
    ckpt = read_checkpoint(scorer_dir)
    assert ckpt.config.num_labels == 1
    model = build_model(ckpt)
    assert model.output.weight.shape == (1, 64)
    params = sum(p.numel() for p in model.parameters())
    lm = ckpt.config.replace(num_labels=0)
    assert params == ckpt.config.num_params() == lm.num_params() - (bpe_tokenizer.vocab_size - 1) * 64
    info = describe(str(scorer_dir))
    assert info["params"] == params and info["config"]["num_labels"] == 1
    assert info["memory_bytes"]["float32"] == 4 * params
    matrices, norms = sharded_params(ckpt.config, Layout())
    assert matrices + norms == params  # the plan's count of what each device stores


@pytest.mark.parametrize("to,name", [("gguf", "out.gguf"), ("meta", "out-meta")])
def test_gguf_and_meta_refuse_a_scorer_in_one_line(scorer_dir, tmp_path, capsys, to, name):
    err = cli_error(capsys, "convert", scorer_dir, tmp_path / name, "--to", to)
    assert "reward model" in err and "--to hf" in err and str(scorer_dir) in err
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_a_quantized_scorer_scores_close_to_the_float_one(scorer_dir, bpe_tokenizer):
    rows = random_rows(bpe_tokenizer.vocab_size, seed=2)
    full = RewardModel.load(scorer_dir).score_tokens(rows)
    int8 = RewardModel.load(scorer_dir, quantize="int8").score_tokens(rows)
    torch.testing.assert_close(int8, full, atol=0.1, rtol=0.05)


def test_each_kind_of_model_is_refused_where_the_other_is_expected(scorer_dir, tmp_path, bpe_tokenizer):
    with pytest.raises(CamelidError, match="a reward model .*camelid reward"):
        camelid.load(scorer_dir)
    random_hf_llama(tmp_path / "lm", bpe_tokenizer)
    with pytest.raises(CamelidError, match="a language model .*not a reward model"):
        RewardModel.load(tmp_path / "lm")


# ---- scores -------------------------------------------------------------------------------------------

def test_batched_scores_equal_one_row_at_a_time_and_keep_the_order(scorer_dir, bpe_tokenizer):
    rm = RewardModel.load(scorer_dir)
    rows = random_rows(bpe_tokenizer.vocab_size, lengths=(12, 3, 40, 3, 25, 7, 1), seed=5)
    alone = torch.cat([rm.score_tokens([r]) for r in rows])
    for batch_size in (1, 3, 16):
        torch.testing.assert_close(rm.score_tokens(rows, batch_size=batch_size), alone, atol=1e-5, rtol=1e-5)
    assert alone.shape == (7,) and len(set(alone.tolist())) == 7


def test_the_head_only_sees_each_rows_last_hidden_state(scorer_dir, bpe_tokenizer, monkeypatch):
    rm = RewardModel.load(scorer_dir)
    seen = []
    head = rm.model.head
    monkeypatch.setattr(rm.model, "head", lambda h: seen.append(tuple(h.shape)) or head(h))
    rm.score_tokens(random_rows(bpe_tokenizer.vocab_size), batch_size=4)
    assert seen == [(4, 64), (1, 64)]


def test_texts_and_conversations_are_scored_as_finetuning_renders_them(scorer_dir, bpe_tokenizer):
    rm = RewardModel.load(scorer_dir)
    text = "Shall I compare thee to a summer's day?"
    conv_ids = encode_conversation(CONVERSATION, bpe_tokenizer, train_on="all").ids
    got = rm.score([text, CONVERSATION])
    want = rm.score_tokens([bpe_tokenizer.encode(text, bos=bpe_tokenizer.add_bos), conv_ids])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rm.score(CONVERSATION), want[1:])  # one conversation alone
    with pytest.raises(CamelidError, match="item 0: the conversation has no assistant turn"):
        rm.score([[{"role": "user", "content": "Hi"}]])
    with pytest.raises(CamelidError, match="row 0: 70 tokens, more than the model's context of 64"):
        rm.score_tokens([[5] * 70])
    with pytest.raises(CamelidError, match="token id 9999 is outside"):
        rm.score_tokens([[5, 9999]])


def test_a_scorer_of_several_labels_gives_a_row_of_scores(tmp_path, bpe_tokenizer):
    native_scorer(tmp_path / "m", bpe_tokenizer, num_labels=3)
    scores = RewardModel.load(tmp_path / "m").score(["Hello", "Shall I"])
    assert scores.shape == (2, 3)


def test_same_tokenizer(bpe_tokenizer, spm_tokenizer):
    assert same_tokenizer(bpe_tokenizer, train_byte_bpe())
    smaller = train_byte_bpe(vocab_size=300)
    assert "vocabulary sizes differ" in tokenizer_difference(bpe_tokenizer, smaller)
    assert spm_tokenizer.vocab_size == bpe_tokenizer.vocab_size  # same size, other pieces
    assert not same_tokenizer(bpe_tokenizer, spm_tokenizer)
    other = train_byte_bpe()
    other.eos_id = 0
    assert tokenizer_difference(bpe_tokenizer, other) == "eos_id differs (2 and 0)"


# ---- camelid reward ------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_scores_pairs_accuracy_and_margins(scorer_dir, tmp_path, capsys):
    pairs = [
        {"prompt": "Shall I compare thee", "chosen": "to a summer's day?", "rejected": "to a winter's night?"},
        {"messages": [{"role": "user", "content": "Rough winds"}],
         "chosen": [{"role": "assistant", "content": "shake"}],
         "rejected": "the darling buds"},
        {"prompt": "def fibonacci(n):", "chosen": "return n", "rejected": "return n"},    # a tie: skipped
        {"prompt": [{"role": "user", "content": "And every fair"}], "chosen": "from fair", "rejected": "declines"},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    capsys.readouterr()
    assert main(["reward", "--model", str(scorer_dir), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "skipped 1 pair(s) whose chosen equals rejected (line 3)" in out.err
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 4]
    rm = RewardModel.load(scorer_dir)
    convs = [[{"role": "user", "content": "Shall I compare thee"}, {"role": "assistant", "content": c}]
             for c in ("to a summer's day?", "to a winter's night?")]
    torch.testing.assert_close(torch.tensor([rows[0]["chosen"], rows[0]["rejected"]]), rm.score(convs))
    margins = [r["chosen"] - r["rejected"] for r in rows]
    assert all(abs(r["margin"] - m) < 1e-6 for r, m in zip(rows, margins))
    correct = sum(m > 0 for m in margins)
    assert f"3 pair(s): accuracy {correct / 3:.4f} (chosen scored higher in {correct})" in out.out
    assert f"mean margin {sum(margins) / 3:.4f}" in out.out


def test_reward_scores_texts_to_stdout(scorer_dir, tmp_path, capsys):
    records = [{"text": "Shall I compare thee"}, {"messages": CONVERSATION},
               {"prompt": "Shall I compare thee?", "completion": "Thou art more lovely"}]
    src = write_jsonl(tmp_path / "texts.jsonl", records)
    capsys.readouterr()
    assert main(["reward", "--model", str(scorer_dir), "--input", str(src), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and "scored 3 record(s)" in out.err
    want = RewardModel.load(scorer_dir).score(["Shall I compare thee", CONVERSATION])
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), torch.cat([want, want[1:]]))


def test_reward_help_teaches_the_record_shapes():
    from camelid.cli.main import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["reward"].format_help()
    for words in ('"chosen", "rejected"', '{"text": str}', "accuracy", "mean margin", "--batch-size",
                  "LlamaForSequenceClassification"):
        assert words in text
