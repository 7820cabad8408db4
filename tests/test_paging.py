"""The paged KV cache (camelid.model.PagedKVCache) and its block pool with prefix reuse
(camelid.generate.paging.BlockPool): the model gives the same logits over blocks as over the
static cache, a shared prefix is computed once, and every block comes back."""

import pytest
import torch

from camelid.generate.paging import BlockPool
from camelid.model import KVCache, PagedKVCache
from test_model import tiny

GEN = torch.Generator().manual_seed(3)


def tokens(model, *shape):
    return torch.randint(0, model.config.vocab_size, shape, generator=GEN)


@pytest.mark.parametrize("name", ["tiny", "tiny-mha"])
def test_paged_decode_equals_the_static_cache(name):
    """Two rows of different prompt lengths, prefilled then decoded, their blocks scattered
    over the pool in no order: the same logits as the static cache at every step."""
    model = tiny(name)
    prompt = tokens(model, 2, 21)
    static = KVCache(model.config, 2, 40)
    paged = PagedKVCache(model.config, num_blocks=16, block_size=8, rows=2, max_blocks=5)
    paged.assign(0, [7, 2, 12, 5, 9])
    paged.assign(1, [3, 14, 1, 11, 6])
    with torch.no_grad():
        a, b = model(prompt, cache=static), model(prompt, cache=paged)
        torch.testing.assert_close(b, a)
        positions = torch.tensor([[21], [21]])
        step = prompt[:, -1:]
        for _ in range(12):
            a = model(step, positions, static)
            b = model(step, positions, paged.view(slice(0, 2), int(positions.max()) + 1))
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            step, positions = a[:, -1].argmax(-1, keepdim=True), positions + torch.tensor([[1], [0]])


def test_a_shared_prefix_is_computed_once_and_gives_the_same_logits():
    """The second request shares 100 tokens with the first: the pool finds its 12 full blocks
    of 8 (96 tokens), the model computes only the 4 + 20 tokens after them, and the logits of
    those equal a full prefill's."""
    model = tiny()
    shared = tokens(model, 1, 100)
    first = torch.cat([shared, tokens(model, 1, 5)], 1)
    second = torch.cat([shared, tokens(model, 1, 20)], 1)
    pool = BlockPool(num_blocks=40, block_size=8)
    cache = PagedKVCache(model.config, 40, 8, rows=1, max_blocks=16)
    with torch.no_grad():
        blocks = pool.allocate(pool.blocks_for(first.size(1)))
        cache.assign(0, blocks)
        model(first, cache=cache)
        pool.register(first[0].tolist(), blocks)
        pool.release(blocks)

        reused = pool.match(second[0, :-1].tolist())
        assert len(reused) == 12 and reused == blocks[:12] and pool.hits == 12
        start = len(reused) * pool.block_size
        own = pool.allocate(pool.blocks_for(second.size(1)) - len(reused))
        cache.assign(0, reused + own)
        computed = second[:, start:]
        logits = model(computed, torch.arange(start, second.size(1)).unsqueeze(0), cache)
        assert computed.size(1) == 24
        torch.testing.assert_close(logits, model(second)[:, start:], rtol=1e-5, atol=1e-5)
        pool.release(reused + own)
    assert pool.available == pool.capacity and pool.used == 0


def test_the_pool_counts_references_and_reclaims_cached_blocks_least_recently_used_first():
    pool = BlockPool(num_blocks=5, block_size=2)         # 4 blocks to lend
    a = pool.allocate(2)
    pool.register([1, 2, 3, 4], a)
    assert pool.match([1, 2, 3, 4, 5]) == a               # held twice now
    pool.release(a)
    assert pool.available == 2                            # still held once
    pool.release(a)
    assert pool.available == 4 and pool.used == 0         # unheld, cached, and lendable
    b = pool.allocate(2)                                  # the free blocks go first: the cache survives
    assert set(b).isdisjoint(a) and pool.match([1, 2, 3, 4]) == a
    pool.release(a)
    assert pool.allocate(3) is None and pool.available == 2   # nothing taken when there is not enough
    pool.match([1, 2])                                    # a[0] used more recently than a[1]
    pool.release(a[:1])
    (c,) = pool.allocate(1)
    assert c == a[1]                                      # the least recently used is reclaimed ...
    assert pool.match([1, 2, 3, 4]) == a[:1]              # ... and forgotten; its prefix before it is kept
    pool.release(a[:1] + b + [c])
    assert pool.available == pool.capacity
    with pytest.raises(ValueError, match="nobody holds it"):
        pool.release([c])


def test_a_block_is_only_found_after_its_whole_prefix():
    pool = BlockPool(num_blocks=8, block_size=2)
    blocks = pool.allocate(3)
    pool.register([1, 2, 3, 4, 5, 6], blocks)
    assert pool.match([9, 9, 3, 4, 5, 6]) == []           # the same second block after another first
    assert pool.match([1, 2, 3, 4, 7, 7]) == blocks[:2]
    assert pool.match([1, 2, 3]) == blocks[:1]            # only full blocks
    assert pool.queried == 3 + 3 + 1 and pool.hits == 3
