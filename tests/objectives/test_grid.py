from collections import Counter

import numpy as np
import pytest

from statelab.objectives import (
    ObjectiveSampler,
    birdie_grid,
    class_uniform_probs,
    decoder_ul2_probs,
    ul2_configs,
    validation_batch,
)
from statelab.objectives.grid import grid_summary


@pytest.mark.parametrize("seq_len", [256, 512, 2048])
def test_birdie_grid_has_the_papers_96_configs(seq_len):
    g = birdie_grid(seq_len)
    assert len(g) == 96
    assert grid_summary(g) == {
        "next_token": 1,
        "prefix_lm": 1,
        "infilling": 36,
        "autoencoding": 36,
        "copying": 2,
        "deshuffling": 4,
        "selective_copying": 16,
    }
    assert len({c.name() for c in g}) == 96  # the names identify the configs
    assert sum(c.shuffle for c in g if c.class_name == "autoencoding") == 18


def test_every_grid_config_makes_examples_that_fit_and_respect_the_config():
    seq_len = 256
    g = birdie_grid(seq_len)
    text = np.random.default_rng(0).integers(32, 127, size=20000)
    s = ObjectiveSampler(g, text, seq_len, seed=3, probs=np.ones(len(g)))
    for _ in range(30):
        s.next_batch(8)
    assert s.stats.failures == 0
    assert (s.stats.samples > 0).sum() > 80
    fr = s.stats.realised_masked_fraction()
    for i, c in enumerate(g):
        if c.class_name == "infilling" and s.stats.masked_n[i]:
            assert abs(fr[i] - c.rate) < 0.05 + 1.0 / c.length[0], c.name()
        if c.class_name == "autoencoding" and s.stats.masked_n[i]:
            assert abs(fr[i] - c.rate) < 0.05 + 1.0 / c.length[0], c.name()


def test_fixed_mixtures():
    g = birdie_grid(256)
    p = class_uniform_probs(g)
    assert np.isclose(p.sum(), 1)
    per_class = Counter()
    for c, pi in zip(g, p, strict=True):
        per_class[c.class_name] += pi
    assert all(np.isclose(v, 1 / 7) for v in per_class.values())
    u = ul2_configs(256)
    assert len(u) == 7
    nt = [c for c in g if c.class_name in ("next_token", "prefix_lm")] + u[:2]
    q = decoder_ul2_probs(nt)
    assert np.allclose(q, [0.6, 0.2, 0.1, 0.1])


def test_sampler_follows_its_probabilities_and_validation_is_fixed():
    g = birdie_grid(256)
    text = np.random.default_rng(0).integers(32, 127, size=5000)
    p = np.zeros(len(g))
    p[5] = 1.0
    s = ObjectiveSampler(g, text, 256, seed=0, probs=p)
    b = s.next_batch(4)
    ids = set(b.config_ids[b.config_ids >= 0].tolist())
    assert ids == {5}
    v1 = validation_batch(g[:4], text, 256, n_per_config=8, seed=9)
    v2 = validation_batch(g[:4], text, 256, n_per_config=8, seed=9)
    assert (v1.tokens == v2.tokens).all()
    assert sorted(set(v1.config_ids[v1.config_ids >= 0].tolist())) == [0, 1, 2, 3]
    with np.testing.assert_raises(ValueError):
        s.set_probs(np.ones(3))
