import numpy as np
import pytest

from statelab.errors import ConfigError
from statelab.objectives import (
    VOCAB,
    AutoencodingConfig,
    CopyingObjectiveConfig,
    DeshufflingConfig,
    InfillingConfig,
    NextTokenConfig,
    PrefixLMConfig,
    SelectiveCopyingObjectiveConfig,
    config_from_dict,
)
from statelab.objectives.corruption import (
    autoencoding,
    copying,
    deshuffling,
    infilling,
    next_token,
    prefix_lm,
    selective_copying,
    span_mask,
)


def text(n, seed=0):
    return np.random.default_rng(seed).integers(32, 127, size=n).astype(np.int64)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_next_token_has_no_prefix_and_target_is_the_chunk():
    x = text(50)
    ex = next_token(x, NextTokenConfig(), rng())
    assert ex.input.shape == (0,)
    assert np.array_equal(ex.target, x)


def test_prefix_lm_split_range_and_min_parts():
    x = text(100)
    cfg = PrefixLMConfig(split=(0.5, 1.0), min_part=4)
    splits = set()
    for s in range(200):
        ex = prefix_lm(x, cfg, rng(s))
        assert np.array_equal(np.concatenate([ex.input, ex.target]), x)
        assert 50 <= len(ex.input) <= 96 and len(ex.target) >= 4
        splits.add(len(ex.input))
    assert len(splits) > 20


def _reconstruct_infill(inp, tgt):
    """Rebuild the original chunk from an infilling example."""
    spans, cur = {}, None
    for t in tgt[:-1]:
        if VOCAB.is_sentinel(np.array([t]))[0]:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inp:
        out.extend(spans[int(t)] if VOCAB.is_sentinel(np.array([t]))[0] else [int(t)])
    return np.array(out)


@pytest.mark.parametrize("rate", [0.05, 0.15, 0.5])
@pytest.mark.parametrize("span", [3.0, 8.0, 32.0])
def test_infilling_rate_is_realised_and_roundtrips(rate, span):
    x = text(1024)
    fr = []
    for s in range(5):
        ex = infilling(x, InfillingConfig(length=(1024, 1024), rate=rate, mean_span=span), rng(s))
        assert ex.target[-1] == VOCAB.eos
        sent_in = ex.input[VOCAB.is_sentinel(ex.input)]
        sent_out = ex.target[VOCAB.is_sentinel(ex.target)]
        # unique, ordered sentinels, the same in input and target
        assert np.array_equal(sent_in, VOCAB.sentinel_base + np.arange(len(sent_in)))
        assert np.array_equal(sent_in, sent_out) and ex.n_spans == len(sent_in)
        assert np.array_equal(_reconstruct_infill(ex.input, ex.target), x)
        fr.append(ex.masked_fraction)
    assert abs(np.mean(fr) - rate) < 0.005
    # the mean span length follows the config (up to the sentinel cap)
    want = max(span, 1024 * rate / VOCAB.n_sentinels)
    assert abs(1024 * rate / ex.n_spans - want) / want < 0.2


def test_span_mask_spans_are_disjoint_and_separated():
    for s in range(50):
        sp = span_mask(97, 0.5, 3.0, rng(s), max_spans=128)
        assert (sp[:, 1] > sp[:, 0]).all()
        assert (sp[1:, 0] > sp[:-1, 1]).all()  # at least one visible token between spans
        assert sp[0, 0] >= 0 and sp[-1, 1] <= 97
        assert int((sp[:, 1] - sp[:, 0]).sum()) == round(0.5 * 97)


@pytest.mark.parametrize("shuffle", [False, True])
def test_autoencoding_target_is_original_and_hides_exactly_the_spans(shuffle):
    x = text(300)
    cfg = AutoencodingConfig(length=(300, 300), rate=0.15, mean_span=3.0, shuffle=shuffle)
    ex = autoencoding(x, cfg, rng(1))
    assert np.array_equal(ex.target, np.concatenate([x, [VOCAB.eos]]))
    n_sent = int(VOCAB.is_sentinel(ex.input).sum())
    assert n_sent == ex.n_spans >= 2
    # exactly L hidden tokens: input = visible tokens + one sentinel per span
    assert len(ex.input) == 300 - round(0.15 * 300) + n_sent
    plain = autoencoding(x, AutoencodingConfig(length=(300, 300), rate=0.15, mean_span=3.0), rng(1))
    # same spans, the multiset of input tokens is kept, the order changes only when shuffling
    assert sorted(ex.input.tolist()) == sorted(plain.input.tolist())
    assert np.array_equal(ex.input, plain.input) != shuffle


def test_copying_and_deshuffling():
    x = text(64)
    ex = copying(x, CopyingObjectiveConfig(), rng())
    assert np.array_equal(ex.input, x) and np.array_equal(ex.target[:-1], x)
    for frac in (0.5, 1.0):
        ex = deshuffling(x, DeshufflingConfig(fraction=frac), rng(3))
        assert np.array_equal(ex.target[:-1], x)
        assert sorted(ex.input.tolist()) == sorted(x.tolist())
        moved = int((ex.input != x).sum())
        assert 2 <= moved <= int(frac * 64)
        assert ex.masked_fraction == int(frac * 64) / 64


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("query_first", [True, False])
def test_selective_copying_targets_are_in_the_visible_context(k, query_first):
    cfg = SelectiveCopyingObjectiveConfig(length=(200, 200), n_spans=k, query_first=query_first, span_length=(4, 12))
    for s in range(20):
        x = text(200, seed=s)
        ex = selective_copying(x, cfg, rng(s))
        inp = ex.input.tolist()
        assert (inp[0] == VOCAB.copy) == query_first
        ci = inp.index(VOCAB.context)
        ctx = inp[ci + 1 : ci + 201]
        assert ctx == x.tolist()  # the whole context is visible
        assert ex.target[-1] == VOCAB.done
        spans = np.split(ex.target[:-1], np.where(ex.target[:-1] == VOCAB.sep)[0])
        spans = [sp[sp != VOCAB.sep].tolist() for sp in spans]
        assert len(spans) == k == inp.count(VOCAB.start) == inp.count(VOCAB.end)
        hay = " ".join(map(str, ctx))
        for sp in spans:
            assert 4 <= len(sp) <= 12
            assert " ".join(map(str, sp)) in hay


def test_selective_copying_example_from_the_paper():
    # context ABCDEF, span DE with delimiters BC and F
    x = np.array([65, 66, 67, 68, 69, 70])
    cfg = SelectiveCopyingObjectiveConfig(length=(6, 6), n_spans=1, span_length=(2, 2), delimiter=(1, 2))
    seen = set()
    for s in range(200):
        ex = selective_copying(x, cfg, rng(s))
        seen.add((tuple(ex.input.tolist()), tuple(ex.target.tolist())))
    want = (
        (VOCAB.context, 65, 66, 67, 68, 69, 70, VOCAB.copy, VOCAB.start, 66, 67, VOCAB.end, 70),
        (68, 69, VOCAB.done),
    )
    assert want in seen


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="rate"):
        InfillingConfig(rate=1.5)
    with pytest.raises(ConfigError, match="unknown config key.*mean_spam"):
        config_from_dict({"class": "infilling", "rate": 0.1, "mean_spam": 3})
    with pytest.raises(ConfigError, match="objective class"):
        config_from_dict({"class": "nope"})
    cfg = config_from_dict({"class": "autoencoding", "rate": 0.85, "mean_span": 8, "shuffle": True, "length": [8, 16]})
    assert isinstance(cfg, AutoencodingConfig) and cfg.shuffle and cfg.length == (8, 16)
    with pytest.raises(ValueError, match="at least"):
        infilling(text(2), InfillingConfig(), rng())


def test_objectives_are_pure_functions_of_the_seed():
    x = text(256)
    cfg = AutoencodingConfig(length=(256, 256), rate=0.5, mean_span=3.0, shuffle=True)
    a, b = autoencoding(x, cfg, rng(7)), autoencoding(x, cfg, rng(7))
    assert np.array_equal(a.input, b.input) and np.array_equal(a.target, b.target)
