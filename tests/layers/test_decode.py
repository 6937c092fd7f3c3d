"""The decode step equals the reference path: ``Matvec`` layouts, each mixer's ``step`` against its ``forward`` on one
token, ``model.step`` against ``model(tokens[:, None], state)``, and ``generate`` against a loop of one-token
``_run`` calls (the path generate took before the decode step existed), with ragged batches, rows that stay put and
rows that stop at EOS. Comparisons are at fp32 round-off; greedy tokens must be identical."""

import pytest
import torch
import torch.nn.functional as F

from statelab.layers.decode import cached_plan, drop_plan, matvec
from statelab.layers.mamba1 import MixerState
from statelab.layers.mamba2 import Mamba2LayerState
from statelab.models.base import StatefulLM, _pick
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.state.core import State
from statelab.testing import assert_close

V = 41


def _mamba1(tied: bool = True) -> Mamba1LM:
    torch.manual_seed(0)
    m = Mamba1LM(Mamba1Config(d_model=16, n_layer=3, vocab_size=V, d_state=8, tie_embeddings=tied))
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_proj.bias.add_(1.0)  # larger Δ: the state matters
    return m.eval()


def _mamba2(limit: tuple[float, float] = (0.0, float("inf"))) -> Mamba2LM:
    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=V, d_model=16, n_layer=3, d_state=8, head_dim=8, n_groups=2, time_step_limit=limit, use_bias=True
    )
    m = Mamba2LM(cfg)
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_bias.add_(1.5)
            b.mixer.chunk_size = 16
    return m.eval()


MODELS = {
    "mamba1": _mamba1,
    "mamba1-untied": lambda: _mamba1(tied=False),
    "mamba2": _mamba2,
    "mamba2-limit": lambda: _mamba2((0.05, 0.5)),
}


@pytest.fixture(scope="module", params=list(MODELS), ids=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _ragged_state(model: StatefulLM, seed: int = 1) -> State:
    """A batch of 4 states after 1, 2, 9 and 20 tokens (short ones leave part of the conv window at zero)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 9, 20]
    ids = torch.randint(0, V, (4, 20), generator=g)
    return model.encode(ids, lengths=lengths)


def test_matvec_layouts_agree():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(7, 5, generator=g), torch.randn(7, generator=g), torch.randn(3, 5, generator=g)
    ref = F.linear(x, w, b)
    for transposed in (False, True):
        mv = matvec(w, b, transposed)
        assert mv.weight.is_contiguous()
        assert_close("matvec", ref, mv(x))
        assert_close("matvec no bias", F.linear(x, w), matvec(w, None, transposed)(x))


def test_cached_plan_follows_the_weights():
    lin = torch.nn.Linear(4, 3)
    built = []

    def build():
        built.append(1)
        return matvec(lin.weight, lin.bias, True)

    p1 = cached_plan(lin, build)
    assert cached_plan(lin, build) is p1 and len(built) == 1
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: the version counter moves
    p2 = cached_plan(lin, build)
    assert len(built) == 2 and torch.equal(p2.weight, lin.weight.detach().t())
    drop_plan(lin)
    cached_plan(lin, build)
    assert len(built) == 3


def _nan_like(state: State) -> State:
    """Buffers full of NaN: a decode step that leaves any entry unwritten shows up in the comparisons."""
    return state.replace(
        ssm=torch.full_like(state.ssm, float("nan")),
        conv=torch.full_like(state.conv, float("nan")),
        sum_delta=torch.full_like(state.sum_delta, float("nan")),
    )


def test_mixer_step_layouts_agree(model):
    """Both weight layouts of the decode step (transposed on CPUs, native elsewhere) give the same token."""
    state = _ragged_state(model)
    x = torch.randn(4, model.config.d_model, generator=torch.Generator().manual_seed(2))
    active = torch.tensor([True, False, True, True])
    cls = MixerState if isinstance(model, Mamba1LM) else Mamba2LayerState
    for i, block in enumerate(model.layers):
        parts = cls(state.conv[i], state.ssm[i], state.sum_delta[i])
        outs = [cls(*(torch.full_like(p, float("nan")) for p in parts[:3])) for _ in range(2)]
        ys = [
            block.mixer.step(x, parts, o, block.mixer.step_weights(t), active)
            for o, t in zip(outs, (True, False), strict=True)
        ]
        assert_close(f"layer {i} y", ys[1], ys[0])
        for name in ("conv", "ssm", "sum_delta"):
            assert_close(f"layer {i} {name}", getattr(outs[1], name), getattr(outs[0], name))


def test_step_with_rows_that_stay_put_equals_run(model):
    """``_step`` with inactive rows equals ``_run`` with lengths 0 for them (generate's internal call), writes every
    entry of its output buffers, leaves inactive rows bit-identical and never writes the state it reads."""
    state = _ragged_state(model)
    before = state.clone()
    tok = torch.tensor([3, 0, 40, 7])
    active = torch.tensor([True, False, True, False])
    ref = model._run(tok[:, None], state, None, True, active.long())
    logits, new = model._step(tok, state, active, _nan_like(state))
    assert_close("logits of active rows", ref.logits[active, 0], logits[active])
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(part, getattr(ref.state, part), getattr(new, part))
        assert torch.equal(getattr(state, part), getattr(before, part)), "the step wrote into the state it read"
        for b in (1, 3):
            assert torch.equal(getattr(new, part)[:, b], getattr(state, part)[:, b]), f"inactive row {b} moved"
    assert new.tokens == ref.state.tokens == (2, 2, 10, 20)


def test_model_step_equals_forward(model):
    state = _ragged_state(model)
    tok = torch.tensor([3, 0, 40, 7])
    before = state.clone()
    ref_logits, ref_state = model(tok[:, None], state)
    logits, new = model.step(tok, state)
    assert_close("logits", ref_logits[:, 0], logits)
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(part, getattr(ref_state, part), getattr(new, part))
        assert torch.equal(getattr(state, part), getattr(before, part)), "step modified its input state"
    assert new.tokens == ref_state.tokens == (2, 3, 10, 21)
    assert new.fingerprint == model.fingerprint
    model.check_state(new, 4)


def test_step_from_zero_and_after_weight_change(model):
    tok = torch.tensor([5, 6])
    ref_logits, ref_state = model(tok[:, None])
    logits, new = model.step(tok)
    assert_close("logits from zero", ref_logits[:, 0], logits)
    assert_close("ssm from zero", ref_state.ssm, new.ssm)
    m = MODELS["mamba1"]() if isinstance(model, Mamba1LM) else MODELS["mamba2"]()
    m.step(tok)  # builds the decode copies
    with torch.no_grad():
        m.layers[0].mixer.out_proj.weight.mul_(1.5)
    assert_close("logits after a weight change", m(tok[:, None])[0][:, 0], m.step(tok)[0])


def _reference_generate(model: StatefulLM, ids, n, lengths, state, eos):
    """generate's loop as it ran before the decode step: one ``_run`` call per token, lengths 0 for stopped rows."""
    batch = model._ragged(ids, lengths, None)
    last = torch.tensor([k - 1 for k in batch.row_lengths()])
    if state is None:
        state = model.zero_state(ids.shape[0])
    prefix = state
    for b in range(ids.shape[0]):  # each row's prompt but its last token, row by row
        k = batch.row_lengths()[b]
        if k > 1:
            rs = model._run(batch.ids[b : b + 1, : k - 1], state.select([b]), None, False).state
            prefix = State.cat([prefix.select(list(range(b))), rs, prefix.select(list(range(b + 1, ids.shape[0])))])
    run = model._run(batch.ids.gather(1, last[:, None]), prefix, None, True)
    logits, state = run.logits[:, -1], run.state
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    toks = []
    for _ in range(n):
        tok = _pick(logits.float(), 0.0, None, None, None)
        active = ~done
        tok = torch.where(done, torch.full_like(tok, eos), tok)
        done = done | (tok == eos)
        toks.append(tok)
        run = model._run(tok[:, None], state, None, True, None if bool(active.all()) else active.long())
        logits, state = run.logits[:, -1], run.state
        if bool(done.all()):
            break
    return torch.stack(toks, 1), state


def test_generate_equals_reference_loop(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (5, 12), generator=g)
    lengths = [12, 1, 5, 3, 9]
    free = model.generate(ids, 8, lengths=lengths)
    eos = int(free.tokens[0, 2])  # row 0 stops after 3 tokens; others stop where they produce it, or run on
    got = model.generate(ids, 8, lengths=lengths, eos_token_id=eos)
    ref_tokens, ref_state = _reference_generate(model, ids, 8, lengths, None, eos)
    assert torch.equal(got.tokens, ref_tokens)
    assert got.state.tokens == ref_state.tokens
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(part, getattr(ref_state, part), getattr(got.state, part))
    hit = ref_tokens == eos
    want = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.tensor(ref_tokens.shape[1]))
    assert torch.equal(got.lengths, want) and int(got.lengths[0]) <= 3


def test_generate_from_ragged_state_equals_reference(model):
    state = _ragged_state(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (4, 6), generator=g)
    lengths = [6, 2, 1, 4]
    got = model.generate(ids, 7, lengths=lengths, state=state, eos_token_id=V - 1)
    ref_tokens, ref_state = _reference_generate(model, ids, 7, lengths, state, V - 1)
    assert torch.equal(got.tokens, ref_tokens)
    assert got.state.tokens == ref_state.tokens
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(part, getattr(ref_state, part), getattr(got.state, part))


def test_step_refuses_bad_tokens(model):
    with pytest.raises(ValueError, match="tokens \\[B\\]"):
        model.step(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="token ids must lie"):
        model.step(torch.tensor([V + 3]))
