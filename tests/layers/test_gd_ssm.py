import pytest
import torch

from statelab.errors import ConfigError, StateMismatchError
from statelab.eval.gd_reference import gd_predict, gd_prefix_predict
from statelab.layers.gd_ssm import (
    GDSSM,
    GDSSMConfig,
    GDSSMState,
    NonlinearGDSSM,
    NonlinearGDSSMConfig,
    ProductTokenSSM,
)
from statelab.tasks.regression import RegressionConfig, interleave, make_regression_batch, product_tokens
from statelab.testing import assert_close

ETA = 6.06


def _batch(target: str, dtype=torch.float64, seed: int = 0, n: int = 10, d: int = 10):
    return make_regression_batch(RegressionConfig(d=d, n_examples=n, target=target), seed, 32, dtype=dtype)


@pytest.mark.parametrize("target", ["vector", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_from_gd_equals_one_gd_step(target, dtype):
    b = _batch(target, dtype)
    model = GDSSM.from_gd(ETA, n_examples=10, d=10, dtype=dtype)
    pred, _ = model(interleave(b))
    ref = gd_predict(b.context_x, b.context_y, b.query_x, ETA, steps=1)
    got = pred[:, -1] if target == "vector" else pred[:, -1, -1:]
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert_close("1-step GD at the query", ref, got, rtol=tol, atol=tol)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("target", ["vector", "scalar"])
def test_stacked_layers_equal_k_step_gd_on_every_prefix(steps, target):
    b = _batch(target, seed=steps)
    model = GDSSM.from_gd(ETA, n_examples=10, d=10, steps=steps, dtype=torch.float64)
    pred, _ = model(interleave(b))
    pred = pred if target == "vector" else pred[..., -1:]
    assert_close(f"{steps}-step GD", gd_predict(b.context_x, b.context_y, b.query_x, ETA, steps), pred[:, -1])
    prefix = gd_prefix_predict(b.x, b.context_y, ETA / 10, steps)
    assert_close(f"{steps}-step GD per prefix", prefix, pred)


def test_more_steps_lower_loss_on_the_default_task():
    b = _batch("vector", seed=5)
    losses = []
    for k in (1, 2, 3):
        pred, _ = GDSSM.from_gd(6.0, 10, 10, steps=k, dtype=torch.float64)(interleave(b))
        losses.append(float(0.5 * (pred.detach()[:, -1] - b.query_y).pow(2).mean()))
    assert losses[0] > losses[1] > losses[2]


def test_discounted_construction_weights_recent_examples():
    b = _batch("scalar", seed=3)
    gamma, c = 0.8, ETA / 10
    pred, _ = GDSSM.from_gd(ETA, 10, 10, discount=gamma, dtype=torch.float64)(interleave(b))
    x, y = b.context_x, b.context_y[..., 0]
    n = x.shape[1]
    weights = gamma ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
    ref = c * torch.einsum("bn,n,bnd,bd->b", y, weights, x, b.query_x)
    assert_close("discounted GD", ref, pred[:, -1, -1])


def test_product_token_construction_equals_gd_on_every_prefix():
    b = _batch("scalar", seed=4)
    model = ProductTokenSSM.from_gd(ETA, 10, 10, dtype=torch.float64)
    pred, state = model(product_tokens(b))
    assert_close("product tokens", gd_prefix_predict(b.x, b.context_y, ETA / 10)[..., 0], pred)
    assert state.shape == (32, 10)


def test_parameter_count_matches_the_public_code_without_b():
    assert sum(p.numel() for p in GDSSM(GDSSMConfig(d=10)).parameters()) == 222


# ---- fast path == naive (the scan itself: tests/ops/test_diag_scan.py) ------------------------------------


def _random_model(num_layers=2, seed=0):
    torch.manual_seed(seed)
    model = GDSSM(GDSSMConfig(d=4, num_layers=num_layers, chunk_size=3)).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.lam.uniform_(-3.0, 0.5)
            layer.log_step.uniform_(-1.0, 0.0)
    return model


def test_model_chunk_equals_naive_with_gradients_wrt_parameters_and_state():
    model = _random_model(num_layers=3)
    tokens = torch.randn(2, 23, 4, dtype=torch.float64)
    s0 = GDSSMState(
        ssm=torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True),
        tail=torch.randn(2, 1, 4, dtype=torch.float64),
        n_tokens=5,
    )
    outs = {}
    for backend in ("naive", "chunk"):
        model.zero_grad()
        s0.ssm.grad = None
        model.backend = backend
        pred, st = model(tokens, s0)
        (pred.pow(2).sum() + st.ssm.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        outs[backend] = (pred.detach(), st.ssm.detach(), grads, s0.ssm.grad.clone())
    n, c = outs["naive"], outs["chunk"]
    assert_close("pred", n[0], c[0])
    assert_close("state", n[1], c[1])
    for name in n[2]:
        assert_close(f"grad {name}", n[2][name], c[2][name])
    assert_close("grad initial state", n[3], c[3])
    assert s0.ssm.grad.abs().sum() > 0


# ---- continuation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 2, 3, 8, 20])
def test_continuation_full_equals_prefix_then_suffix_equals_token_by_token(split):
    model = _random_model()
    tokens = torch.randn(2, 21, 4, dtype=torch.float64)
    full, s_full = model(tokens)
    p1, s1 = model(tokens[:, :split])
    keep = s1.clone()
    p2, s2 = model(tokens[:, split:], s1)
    assert torch.equal(s1.ssm, keep.ssm) and torch.equal(s1.tail, keep.tail)
    assert_close("prefix+suffix", full, torch.cat([p1, p2], dim=1))
    assert_close("state", s_full.ssm, s2.ssm)
    state, outs = None, []
    model.backend = "naive"
    for t in range(tokens.shape[1]):
        o, state = model(tokens[:, t : t + 1], state)
        outs.append(o)
    assert_close("token by token", full, torch.cat(outs, dim=1))
    assert_close("token-by-token state", s_full.ssm, state.ssm)
    assert state.n_tokens == 21 and state.tail.shape[1] == 1


def test_product_token_chunk_naive_and_continuation():
    torch.manual_seed(0)
    model = ProductTokenSSM(3).double()
    u = torch.randn(2, 9, 6, dtype=torch.float64)
    full, s = model(u)
    model.backend = "naive"
    naive, s_n = model(u)
    model.backend = "chunk"
    assert_close("naive", naive, full)
    a, sa = model(u[:, :4])
    b, sb = model(u[:, 4:], sa)
    assert_close("continued", full, torch.cat([a, b], dim=1))
    assert_close("state", s, sb)


def test_nonlinear_model_continuation_tracks_token_parity():
    torch.manual_seed(0)
    model = NonlinearGDSSM(NonlinearGDSSMConfig(d_in=1, d_out=1, width=6, embed="mlp", num_layers=2)).double()
    tokens = torch.randn(3, 21, 1, dtype=torch.float64)
    full, _ = model(tokens)
    a, st = model(tokens[:, :7])
    model.backend = "naive"
    b, _ = model(tokens[:, 7:], st)
    assert full.shape == (3, 10, 1)
    assert_close("nonlinear continued", full, torch.cat([a, b], dim=1))


def test_nonlinear_extension_can_express_the_linear_construction():
    b = _batch("scalar", seed=7, d=3)
    model = NonlinearGDSSM(NonlinearGDSSMConfig(d_in=3, d_out=1, width=3, head="linear")).double()
    model.core = GDSSM.from_gd(ETA, 10, 3, dtype=torch.float64)
    with torch.no_grad():
        model.embed_y.weight.copy_(torch.eye(3))
        model.embed_y.bias.zero_()
        model.out.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
        model.out.bias.zero_()
    pred, _ = model(interleave(b))
    assert_close("nonlinear=linear", gd_predict(b.context_x, b.context_y, b.query_x, ETA), pred[:, -1])


def test_bad_inputs_raise_clear_errors():
    model = GDSSM(GDSSMConfig(d=4))
    with pytest.raises(ConfigError, match=r"\[B, T, 4\]"):
        model(torch.zeros(2, 5, 3))
    with pytest.raises(StateMismatchError):
        model(torch.zeros(2, 5, 4), model.zero_state(3))
    with pytest.raises(StateMismatchError, match="tail"):
        GDSSMState(ssm=torch.zeros(1, 2, 4, 4), tail=torch.zeros(2, 2, 4), n_tokens=5)
    with pytest.raises(ConfigError):
        GDSSMConfig(d=0)
    with pytest.raises(ConfigError):
        GDSSM.from_gd(1.0, 10, 4, discount=1.5)


def test_max_decay_reports_growth():
    model = _random_model()
    assert model.max_decay() > 1.0
    assert GDSSM.from_gd(1.0, 10, 4).max_decay() == 1.0
