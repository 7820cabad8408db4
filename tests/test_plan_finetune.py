"""camelid plan --finetune: the QLoRA paper's verdicts (7B on 24 GB, 65B on 48 GB), the
arithmetic of adapters, bad input, and the plan held against the measured peak of real
FinetuneTrainer steps (camelid.plan.live) for full, LoRA and QLoRA."""

import json

import pytest

from camelid.cli.main import main
from camelid.config import get_size
from camelid.errors import CamelidError
from camelid.plan import plan_finetune, plan_training, weight_bytes
from camelid.plan.finetune import DEFAULT_TARGETS, adapter_params
from helpers import cli_error


def finetune_json(capsys, *argv):
    capsys.readouterr()
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size, memory, group", [("7B", "24GB", "32"), ("65B", "48GB", "32"), ("65B", "48GB", "64")])
def test_qlora_paper_sizes_fit(capsys, size, memory, group):
    # Dettmers et al. 2023: 7B on a 24 GB card, 65B on one 48 GB GPU (sequences of 512 tokens,
    # one per micro-batch, gradient checkpointing)
    out = finetune_json(capsys, size, "--finetune", "qlora", "--memory", memory, "--seq-len", "512",
                        "--micro-batch", "1", "--group-size", group)
    assert out["mode"] == "finetune" and out["method"] == "qlora" and out["lora"]["rank"] == 16
    assert "full" in out["verdict"]["fits"]
    if size == "7B":
        assert "full" in out["verdict"]["comfortable"]


@pytest.mark.parametrize("argv, fits", [
    (["7B", "--finetune", "lora", "--memory", "24GB", "--seq-len", "512"], ["none", "selective", "full"]),
    (["7B", "--finetune", "full", "--memory", "24GB", "--seq-len", "512"], []),     # 16 bytes a weight
    (["65B", "--finetune", "lora", "--memory", "48GB", "--seq-len", "512"], []),
    (["65B", "--finetune", "qlora", "--memory", "24GB", "--seq-len", "512"], [])])
def test_finetune_verdicts(capsys, argv, fits):
    out = finetune_json(capsys, *argv)
    assert out["verdict"]["fits"] == fits
    assert ("does not fit" in out["verdict"]["text"]) == (not fits)
    for r in out["rows"]:
        resident = sum(r[f"{k}_bytes"] for k in ("weights", "adapters", "gradients", "optimizer", "overhead"))
        peak = max(r["gathered_bytes"] + r["activations_bytes"] + r["working_bytes"], r["update_bytes"])
        assert r["total_bytes"] == resident + peak


def test_full_finetuning_is_pretrainings_plan():
    c = get_size("7B")
    full = plan_finetune(c, "full", 1, 512, overhead=0)
    train = plan_training(c, micro_batch=1, seq_len=512, overhead=0)
    assert [f.total for f in full] == [t.total for t in train]


def test_adapter_arithmetic():
    c = get_size("7B")
    # rank r on every linear layer of a block: r * (in + out) each
    assert adapter_params(c, 16, DEFAULT_TARGETS) == 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert adapter_params(c, 8, ("output",)) == 8 * (32000 + 4096)
    lora, qlora = (plan_finetune(c, m, modes=("full",), overhead=0)[0] for m in ("lora", "qlora"))
    n = lora.trainable_params
    assert lora.adapters == lora.gradients == 4 * n and lora.optimizer == 8 * n
    assert lora.weights == 2 * c.num_params() and qlora.weights == weight_bytes(c, "int4", "bfloat16", 32)
    # QLoRA's saved activations are LoRA's: the base's precision changes only the weights and transients
    assert qlora.activations == lora.activations
    rows = plan_finetune(c, "qlora", seq_len=1024, overhead=0)
    assert rows[0].activations > rows[1].activations > 10 * rows[2].activations
    assert plan_finetune(c, "qlora", seq_len=1024, rank=64, overhead=0)[2].total > rows[2].total


def test_finetune_table_and_help(capsys):
    assert main(["plan", "7B", "--finetune", "qlora", "--memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "frozen base (int4)" in out and "adapters (fp32)" in out and "ac selective" in out
    assert "verdict: QLoRA (int4) rank 16 of 7B on one device of 24GB" in out
    assert main(["plan", "7B", "--finetune", "full", "--memory", "80GB", "--dp-shard", "8", "--ac", "full"]) == 0
    assert "full finetuning of 7B on 8 devices" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--finetune qlora" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["7B", "--train", "--finetune", "lora", "--memory", "24GB"], "--finetune"),
    (["7B", "--finetune", "dora", "--memory", "24GB"], "dora"),
    (["7B", "--finetune", "lora", "--memory", "24GB", "--rank", "0"], "--rank"),
    (["7B", "--finetune", "lora", "--memory", "24GB", "--rank", "5000"], "--rank"),
    (["7B", "--finetune", "--memory", "24GB"], "--finetune"),                    # no method, no recipe
    (["7B", "--finetune", "lora", "--memory", "24GB", "--batch", "2"], "--batch"),
    (["7B", "--memory", "24GB", "--rank", "8"], "--rank"),
    (["7B", "--train", "--memory", "24GB", "--rank", "8"], "--rank"),
    (["7B", "--finetune", "lora", "--memory", "24GB", "--dp-shard", "2"], "--finetune lora"),
    (["7B", "--finetune", "full", "--memory", "24GB", "--tp", "2"], "--tp"),
    (["7B", "--finetune", "qlora", "--memory", "24GB", "--seq-len", "4096"], "--seq-len")])
def test_finetune_bad_input_exits_2_with_one_line(capsys, argv, flag):
    assert flag in cli_error(capsys, "plan", *argv)


# ---- against measurement ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Two-turn conversations of a few hundred tokens, enough to fill packed rows of 256."""
    import random

    rnd = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and runs far away".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(rnd.choices(words, k=rnd.randint(20, 80)))},
                          {"role": "assistant", "content": " ".join(rnd.choices(words, k=rnd.randint(20, 80)))}]}
            for _ in range(200)]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_checkpoint(directory, tokenizer, **shape):
    """A camelid checkpoint of random weights in the given shape (vocabulary at least the tokenizer's)."""
    import torch

    from camelid.checkpoint.native import write_native
    from camelid.model import Transformer

    config = get_size("tiny").replace(**shape)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    write_native(directory, config, tokenizer, model.state_dict().items())
    return directory, config


SHAPES = {  # the blocks make the peak; the loss over a wider vocabulary makes it
    "blocks": {"dim": 512, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 512},
    "loss": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 8192}}


@pytest.mark.parametrize("shape, method, ac", [
    ("blocks", "lora", "none"), ("blocks", "lora", "selective"), ("blocks", "lora", "full"),
    ("blocks", "qlora", "none"), ("blocks", "qlora", "selective"), ("blocks", "qlora", "full"),
    ("blocks", "full", "selective"), ("loss", "lora", "none"), ("loss", "qlora", "full"), ("loss", "full", "none")])
def test_finetune_plan_matches_measured_peak(tmp_path, bpe_tokenizer, chats, shape, method, ac):
    import torch

    from camelid.finetune.config import load_finetune_config
    from camelid.finetune.trainer import FinetuneTrainer
    from camelid.plan import measure_training_step

    seq_len, micro_batch = 256, 2
    base, config = base_checkpoint(tmp_path / "base", bpe_tokenizer, **SHAPES[shape])
    # float32: bfloat16 is emulated on most CPUs (slow); train_on all: the loss covers the rows
    # the plan counts. Two micro-batches a step, so that gradients are resident in the second.
    cfg = load_finetune_config(None, [
        f"--run.dir={tmp_path / 'run'}", f"--model.base={base}", f"--model.method={method}",
        f"--data.train=[\"{chats}\"]", f"--data.seq_len={seq_len}", "--data.val_fraction=0.1", "--data.train_on=all",
        f"--train.micro_batch={micro_batch}", f"--train.batch_tokens={2 * micro_batch * seq_len}",
        "--train.dtype=float32", f"--train.activation_checkpointing={ac}", "--train.device=cpu", "--train.threads=1",
        "--train.max_steps=10", "--lora.dropout=0.1"])
    threads = torch.get_num_threads()
    try:
        resident, step_peak, compute_peak = measure_training_step(FinetuneTrainer(cfg, log=False))
    finally:
        torch.set_num_threads(threads)
    row, = plan_finetune(config, method, micro_batch, seq_len, "float32", rank=cfg.lora.rank,
                         targets=tuple(cfg.lora.targets), dropout=True, modes=(ac,), cpu=True)
    # weights, adapters, gradients and AdamW states exactly, but for AdamW's scalar step counters
    assert 0 <= resident - row.resident < 4096
    assert row.total == pytest.approx(step_peak, rel=0.10)
    # and the forward/backward part alone, so that the resident state cannot hide an error
    assert row.compute == pytest.approx(compute_peak - resident, rel=0.10)


def test_finetune_constants_follow_the_code():
    import camelid.finetune.trainer
    import camelid.lora.layers
    import camelid.quant.layers
    import camelid.plan.finetune as plan

    assert plan.HEAD_CHUNK == camelid.finetune.trainer.HEAD_CHUNK
    assert plan.CHUNK_ELEMENTS == camelid.quant.layers.CHUNK_ELEMENTS
    assert plan.TARGETS == camelid.lora.layers.TARGETS


def test_finetune_from_a_recipe(capsys, tmp_path):
    recipe = tmp_path / "sft.toml"
    recipe.write_text('[model]\nbase = "7B"\nmethod = "qlora"\ngroup_size = 64\n[lora]\nrank = 8\n'
                      'targets = ["wq", "wv"]\n[data]\nbuiltin = "corpus-quiz"\nseq_len = 512\n'
                      '[train]\nmicro_batch = 2\nactivation_checkpointing = "full"\ndevice = "cuda"\n')
    out = finetune_json(capsys, str(recipe), "--finetune", "--memory", "24GB")
    assert (out["source"], out["method"], out["micro_batch"], out["seq_len"]) == ("finetune recipe", "qlora", 2, 512)
    assert out["lora"]["rank"] == 8 and out["lora"]["targets"] == ["wq", "wv"]
    assert out["quantize"] == {"scheme": "int4", "group_size": 64}
    assert out["verdict"]["recipe_ac"] == "full" and "the recipe's full fits" in out["verdict"]["text"]
    out = finetune_json(capsys, str(recipe), "--finetune", "lora", "--memory", "24GB", "--rank", "4")
    assert out["method"] == "lora" and out["lora"]["rank"] == 4                  # flags override the recipe
    assert "recipe" in cli_error(capsys, "plan", str(recipe), "--memory", "24GB")
