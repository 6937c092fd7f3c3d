"""The prefix-state cache: chained block keys, longest-prefix lookup, LRU by bytes, counters."""

import pytest
import torch

from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.serve.cache import CachedPrefix, PrefixCache, state_digest


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=40, d_state=4)).eval()


def _entry(model, ids: list[int]) -> CachedPrefix:
    return CachedPrefix(model.encode(torch.tensor([ids[:-1]])), len(ids))


def test_keys_chain_over_blocks_and_start_state():
    c = PrefixCache(1 << 20, 4)
    ids = list(range(11))
    keys = c.block_keys("none", ids)
    assert len(keys) == 2  # 11 tokens: two full blocks, the tail of 3 is never a key
    assert c.block_keys("none", ids[:8]) == keys and c.block_keys("none", ids[:4]) == keys[:1]
    changed = c.block_keys("none", [99, *ids[1:]])
    assert changed[0] != keys[0] and changed[1] != keys[1]  # a change in block 0 changes every later key
    assert c.block_keys("skill-digest", ids)[0] != keys[0]
    assert c.block_keys("none", ids[:3]) == []


def test_lookup_returns_the_deepest_contiguous_prefix(model):
    c = PrefixCache(1 << 20, 4)
    ids = list(range(1, 13))
    keys = c.block_keys("none", ids)
    e1, e2, e3 = (_entry(model, ids[: 4 * k]) for k in (1, 2, 3))
    c.insert(keys[0], e1)
    c.insert(keys[2], e3)  # block 1 missing: block 2 cannot be used
    assert c.lookup(keys) is e1
    assert (c.hits, c.misses) == (1, 2)
    c.insert(keys[1], e2)
    assert c.lookup(keys) is e3
    assert (c.hits, c.misses, c.lookups_with_hit) == (4, 2, 2)
    assert c.lookup(c.block_keys("none", [7, 7])) is None and c.short_prompts == 1
    assert c.stats()["hit_rate"] == pytest.approx(4 / 6)


def test_lru_by_bytes(model):
    e = _entry(model, [1, 2, 3, 4])
    c = PrefixCache(3 * e.nbytes, 4)
    keys = [bytes([i]) * 16 for i in range(4)]
    for k in keys[:3]:
        c.insert(k, e)
    assert len(c) == 3 and c.nbytes == 3 * e.nbytes
    c.lookup([keys[0]])  # key 0 is now the most recently used
    c.insert(keys[3], e)
    assert keys[1] not in c and all(k in c for k in (keys[0], keys[2], keys[3]))
    assert c.evictions == 1 and c.nbytes == 3 * e.nbytes
    c.insert(keys[3], e)  # replacing an entry does not count its bytes twice
    assert c.nbytes == 3 * e.nbytes


def test_budget_zero_or_too_small_keeps_nothing(model):
    e = _entry(model, [1, 2, 3, 4])
    for budget in (0, e.nbytes - 1):
        c = PrefixCache(budget, 4)
        c.insert(b"k" * 16, e)
        assert len(c) == 0 and c.nbytes == 0
    assert not PrefixCache(0, 4).enabled
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCache(10, 0)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1, 4)


def test_state_digest_is_a_content_hash(model):
    s = model.encode(torch.tensor([[1, 2, 3]]))
    assert state_digest(None) == "none"
    assert state_digest(s) == state_digest(s.clone())
    assert state_digest(s) != state_digest(model.encode(torch.tensor([[1, 2, 4]])))
    assert state_digest(s) != state_digest(s.replace(n_tokens=4))
