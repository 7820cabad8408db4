import json

import pytest
import torch

from camelid.cli.main import main
from camelid.config import SIZES, ModelConfig, get_size
from camelid.errors import CamelidError
from camelid.model import Transformer

PAPER_COUNTS = {"7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "65B": 65_285_660_672}


@pytest.mark.parametrize("name,count", PAPER_COUNTS.items())
def test_paper_parameter_counts_on_meta_device(name, count):
    with torch.device("meta"):
        model = Transformer(get_size(name))
    assert sum(p.numel() for p in model.parameters()) == count
    assert get_size(name).num_params() == count


def test_every_named_size_counts_consistently():
    for name, cfg in SIZES.items():
        with torch.device("meta"):
            model = Transformer(cfg)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params(), name


def test_swiglu_hidden_sizes_follow_the_paper():
    # 2/3 * 4d rounded up to a multiple of 256 (7B: 11008, 13B: 13824, 33B: 17920, 65B: 22016)
    assert [get_size(n).ffn_dim for n in ("7B", "13B", "33B", "65B")] == [11008, 13824, 17920, 22016]
    assert get_size("llama2-70B").ffn_dim == 28672
    assert get_size("llama3-8B").ffn_dim == 14336


def test_info_json_cli(capsys):
    assert main(["info", "7B", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 6_738_415_616
    assert d["config"]["dim"] == 4096 and d["config"]["norm_eps"] == 1e-6


def test_config_errors_name_the_field():
    with pytest.raises(CamelidError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(CamelidError, match="unknown field"):
        ModelConfig.from_dict({"dim": 64, "n_layers": 1, "n_heads": 4, "heads": 2})
    with pytest.raises(CamelidError, match="unknown model size"):
        get_size("8B")
