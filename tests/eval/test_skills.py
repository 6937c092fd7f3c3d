"""start_state: the zero state, a stored skill or a soup, from a real StateStore, checked against the model."""

import pytest
import torch

import statelab
from statelab.errors import ConfigError, StateMismatchError, StoreError
from statelab.eval.skills import parse_soup, parse_weights, start_state
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.state.store import StateStore


def _mamba1(seed=0):
    torch.manual_seed(seed)
    return Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=37, d_state=4)).eval()


def _mamba2(seed=0):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(vocab_size=37, d_model=16, n_layer=2, d_state=8, head_dim=8)).eval()


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    return _mamba1() if request.param == "mamba1" else _mamba2()


@pytest.fixture(scope="module")
def store(tmp_path_factory, model):
    # read-only for every test: built once per model
    st = StateStore(tmp_path_factory.mktemp("skills") / "skills")
    for i, name in enumerate(["a", "b", "c"]):
        ids = torch.randint(0, 37, (1, 5 + 3 * i), generator=torch.Generator().manual_seed(i))
        st.add(model.encode(ids), name=name, prompt=f"prompt {name}")
    return st


def test_neither_is_the_zero_state(model, store):
    assert start_state(model) is None
    assert start_state(model, store=store) is None


def test_skill_is_the_stored_state(model, store):
    s = start_state(model, store=store, skill="b")
    assert s.equal(store.get("b")) and s.batch_size == 1
    # a path to the store works the same
    assert start_state(model, store=str(store.path), skill="b").equal(s)


@pytest.mark.parametrize("method", ["mean", "weighted", "adecay"])
def test_soup_is_the_mix_of_the_entries(model, store, method):
    weights = [0.25, 0.75] if method == "weighted" else None
    got = start_state(model, store=store, soup=["a", "c"], mix=method, weights=weights)
    opts = {"A": model.decay_A()} if method == "adecay" else {}
    want = statelab.mix([store.get("a"), store.get("c")], method, weights, **opts)
    assert got.equal(want)
    assert start_state(model, store=store, soup="a+c", mix=method, weights=weights).equal(want)
    assert not got.equal(store.get("a"))


def test_state_of_another_model_names_both_fingerprints(model, store):
    other = _mamba1(seed=1) if model.arch == "mamba1" else _mamba2(seed=1)
    with pytest.raises(StateMismatchError) as e:
        start_state(other, store=store, skill="a")
    assert model.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    with pytest.raises(StateMismatchError):
        start_state(other, store=store, soup="a+b")


def test_unknown_entry_is_named(model, store):
    with pytest.raises(StoreError, match="'nope'"):
        start_state(model, store=store, skill="nope")
    with pytest.raises(StoreError, match="'zzz'"):
        start_state(model, store=store, soup=["a", "zzz"])


def test_bad_combinations(model, store, tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        start_state(model, store=store, skill="a", soup=["b"])
    with pytest.raises(ConfigError, match="soup"):
        start_state(model, store=store, skill="a", weights=[1.0])
    with pytest.raises(ConfigError, match="soup"):
        start_state(model, store=store, mix="sum")
    with pytest.raises(StoreError, match="store"):
        start_state(model, skill="a")
    with pytest.raises(StoreError, match="no state store"):
        start_state(model, store=tmp_path / "missing", skill="a")
    assert not (tmp_path / "missing").exists()  # a wrong path is not created
    with pytest.raises(ConfigError, match="unknown mixing method"):
        start_state(model, store=store, soup="a+b", mix="blend")
    with pytest.raises(ConfigError, match="2 weights"):
        start_state(model, store=store, soup="a+b", mix="weighted", weights=[1.0])
    with pytest.raises(ConfigError, match="at least one"):
        start_state(model, store=store, soup=[])


def test_parsers():
    assert parse_soup("a+ b +c") == ["a", "b", "c"]
    assert parse_soup("only") == ["only"]
    for bad in ["", "a++b", "a+", "+"]:
        with pytest.raises(ConfigError):
            parse_soup(bad)
    assert parse_weights("0.7+0.3") == [0.7, 0.3] == parse_weights("0.7,0.3")
    with pytest.raises(ConfigError, match="numbers"):
        parse_weights("0.7+x")


def test_a_skill_of_the_checkpoint_in_another_dtype_is_adopted_only_when_asked(tmp_path):
    fp32 = statelab.load_model("embedded")
    bf16 = statelab.load_model("embedded", dtype=torch.bfloat16)
    st = StateStore(tmp_path / "skills")
    st.add(fp32.encode(torch.tensor([[81, 58, 32, 99, 97, 116, 10]])), name="s")
    with pytest.raises(StateMismatchError, match="bfloat16|float32"):
        start_state(bf16, store=st, skill="s")
    got = start_state(bf16, store=st, skill="s", adopt=True)
    assert got.equal(bf16.adopt_state(st.get("s")))
    own = bf16.encode(torch.tensor([[81]])).dtype  # the bf16 model's own state dtype (Mamba-2: fp32)
    assert got.fingerprint == bf16.fingerprint and got.dtype == own
    assert start_state(bf16, store=st, soup="s+s", adopt=True).fingerprint == bf16.fingerprint
