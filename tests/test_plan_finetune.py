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
