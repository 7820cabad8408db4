"""`camelid serve --kv-memory GIB --block-size N`: the pool that the planner's kv_pool() gives
reaches the Batcher, through the command's own code path (in process, with a tiny model; the
uvicorn server is replaced by one that returns at once). Bad values: tests/test_errors_generate.py."""

from __future__ import annotations

import pytest
import torch

from camelid.cli import serve as serve_cli
from camelid.cli.main import main
from camelid.plan import gib_bytes, kv_pool
from helpers import random_hf_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("serve-pool") / "hf"
    random_hf_llama(d, bpe_tokenizer, kv_heads=2)  # 2 layers, 2 KV heads of 16, context 256
    return d


@pytest.fixture
def serve(monkeypatch, capsys, model_dir):
    """Runs `camelid serve --model model_dir ARGS` up to the server's start; returns the Batcher
    it built and what it printed on stderr."""
    built = []

    class NoServer:
        def run(self):
            pass

    def server(config, batcher):
        built.append(batcher)
        return NoServer()

    monkeypatch.setattr(serve_cli, "_server", server)
    # its handler would stop camelid.serve's records reaching the other tests' caplog
    monkeypatch.setattr(serve_cli, "_log_like_uvicorn", lambda level: None)

    def run(*args: str):
        capsys.readouterr()
        code = main(["serve", "--model", str(model_dir), "--port", "0", "--device", "cpu", "--no-compile", *args])
        err = capsys.readouterr().err
        assert code == 0, err
        return built[-1], err

    return run


def test_kv_memory_and_block_size_size_the_pool(serve):
    batcher, err = serve("--kv-memory", "0.0025", "--block-size", "8", "--max-batch", "2")
    config = batcher.engine.config
    pool = kv_pool(config, gib_bytes(0.0025), context=256, kv_dtype="float32", block_size=8)
    # by hand: a block is 2 (K, V) x 2 layers x 8 tokens x 2 KV heads x 16 x 4 bytes = 4 KiB
    assert pool.block_bytes == 2 * 2 * 8 * 2 * 16 * 4 == 4096
    assert pool.num_blocks == int(0.0025 * 2**30) // 4096 == 655
    assert batcher.pool.num_blocks == pool.num_blocks and batcher.pool.block_size == 8
    assert batcher.cache.num_blocks == 655 and batcher.cache.block_size == 8
    assert batcher.cache.nbytes() == pool.nbytes <= gib_bytes(0.0025)
    assert batcher.engine.dtype == torch.float32
    assert pool.requests == 20                          # 654 // 32: far more than --max-batch 2 whole contexts
    assert "(654 blocks of 8 tokens)" in err


def test_without_kv_memory_the_pool_holds_max_batch_whole_contexts(serve):
    batcher, err = serve("--max-batch", "3")
    assert batcher.pool.block_size == 16 and batcher.pool.num_blocks == 3 * 256 // 16 + 1
    batcher, _ = serve("--max-batch", "3", "--block-size", "32")
    assert batcher.pool.block_size == 32 and batcher.pool.num_blocks == 3 * 256 // 32 + 1


def test_the_least_kv_memory_the_refusal_names_is_enough(serve, capsys, model_dir):
    capsys.readouterr()
    argv = ["serve", "--model", str(model_dir), "--port", "0", "--device", "cpu", "--no-compile", "--context", "100"]
    assert main([*argv, "--kv-memory", "0.00005"]) == 2
    least = capsys.readouterr().err.split("give --kv-memory ")[1].split()[0]
    batcher, _ = serve("--context", "100", "--kv-memory", least)
    assert batcher.pool.capacity == 7                   # ceil(100 / 16) blocks: one request of the whole context
