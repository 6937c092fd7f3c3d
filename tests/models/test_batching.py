"""Bulk encoding: ``encode_texts`` equals ``model.encode`` text by text; ``length_buckets`` keeps its budget.

States are compared at fp32 round-off (``assert_close``; a batch's projections run as one matrix product whose
blocking may differ from a single row's), token counts exactly.
"""

import random

import pytest
import torch

from statelab.errors import StateMismatchError
from statelab.models.batching import EmptyTextError, encode_texts, length_buckets, tokenize_texts
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.mamba2 import Mamba2Config, Mamba2LM
from statelab.models.tokenizer import ByteTokenizer
from statelab.testing import assert_close

V = 259  # the byte tokenizer's vocabulary


def _mamba1() -> Mamba1LM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=V, d_state=8, d_conv=4))
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_proj.bias.add_(1.0)  # larger Δ: the state depends on every token
    return m.eval()


def _mamba2() -> Mamba2LM:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = Mamba2LM(Mamba2Config(vocab_size=V, d_model=16, n_layer=2, d_state=8, head_dim=8, n_groups=2, d_conv=4))
    with torch.no_grad():
        for b in m.layers:
            b.mixer.dt_bias.add_(1.5)
            b.mixer.chunk_size = 16  # texts cross several chunks
    return m.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these tiny models: on a busy 2-core machine a second thread made them 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    return {"mamba1": _mamba1, "mamba2": _mamba2}[request.param]()


class WordTokenizer:
    """A tokenizer with only ``encode`` (no ``encode_batch``), as a user may bring: one id per character class
    run, so token counts differ from byte counts."""

    vocab_size = V
    pad_token_id = eos_token_id = bos_token_id = None
    fingerprint = "word-tokenizer"

    def encode(self, text: str) -> list[int]:
        out, word = [], ""
        for ch in text + " ":
            if ch.isalnum():
                word += ch
                continue
            if word:
                out.append(sum(map(ord, word)) % 200)
                word = ""
            if not ch.isspace():
                out.append(200 + ord(ch) % 59)
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _texts(seed: int = 0) -> list[str]:
    """Texts of 1..200 bytes: the awkward lengths (1, K - 1, K, around the chunk sizes, 200) and random ones."""
    rng = random.Random(seed)
    lengths = [1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 199, 200] + [rng.randint(1, 200) for _ in range(9)]
    rng.shuffle(lengths)
    alphabet = "abcdefghij klmnop: QRST\n,.!"
    return ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]


def _alone(model, tokenizer, text, state=None):
    ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
    return model.encode(ids, state=state)


def _same(name, got, want):
    assert got.batch_size == 1, f"{name}: batch {got.batch_size}"
    for part in ("ssm", "conv", "sum_delta"):
        assert_close(f"{name}.{part}", getattr(want, part), getattr(got, part))
    assert got.tokens == want.tokens, f"{name}: token counts {got.tokens} vs {want.tokens}"


@pytest.mark.parametrize("batch_tokens", [256, 8192], ids=["many-batches", "one-batch"])
@pytest.mark.parametrize("start", ["zero", "prefix"])
def test_encode_texts_equals_encode_one_at_a_time(model, batch_tokens, start):
    tok = ByteTokenizer()
    texts = _texts()
    state = None if start == "zero" else _alone(model, tok, "Q: cat\nA: CAT\n\n")
    before = None if state is None else state.clone()
    got = encode_texts(model, tok, texts, state=state, batch_tokens=batch_tokens)
    assert len(got) == len(texts)
    n0 = 0 if state is None else state.n_tokens
    for i, text in enumerate(texts):
        _same(f"text {i} ({len(text)} bytes)", got[i], _alone(model, tok, text, state))
        assert got[i].n_tokens == n0 + len(text.encode())  # input order: each state belongs to its own text
        assert got[i].ssm.untyped_storage().nbytes() == got[i].ssm.numel() * got[i].ssm.element_size()
    if state is not None:
        assert state.equal(before), "the start state was modified"


def test_a_tokenizer_with_only_encode(model):
    tok = WordTokenizer()
    texts = _texts(1)
    got = encode_texts(model, tok, texts, batch_tokens=64)
    for i, text in enumerate(texts):
        _same(f"text {i}", got[i], _alone(model, tok, text))


def test_tokenize_texts_batch_and_one_by_one_agree():
    tok = ByteTokenizer()
    texts = _texts(2)
    rows = tokenize_texts(tok, texts)
    assert [r.tolist() for r in rows] == [tok.encode(t) for t in texts]
    assert all(r.dtype == torch.long for r in rows)


def _hf_word_level(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from statelab.models.tokenizer import load_tokenizer

    words = ["abc", "def", "ghi", "jkl", "mno"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path)


def test_hf_tokenizer_in_chunks_names_the_empty_text(model, tmp_path, monkeypatch):
    import statelab.models.batching as batching

    tok = _hf_word_level(tmp_path)
    monkeypatch.setattr(batching, "_TOKENIZE_CHUNK", 4)  # several encode_batch calls
    rng = random.Random(4)
    texts = [" ".join(rng.choice(["abc", "def", "ghi", "jkl", "mno", "x"]) for _ in range(rng.randint(1, 90)))
             for _ in range(11)]  # fmt: skip
    assert [r.tolist() for r in tokenize_texts(tok, texts)] == [tok.encode(t) for t in texts]
    got = encode_texts(model, tok, texts, batch_tokens=100)
    for i, text in enumerate(texts):
        _same(f"text {i}", got[i], _alone(model, tok, text))
    # whitespace is not empty text but gives no tokens; index 9 sits in the third chunk
    with pytest.raises(ValueError, match="text 9 is empty"):
        encode_texts(model, tok, texts[:9] + ["   "] + texts[9:])


def test_progress_bar_reports_throughput(model, capsys):
    texts = _texts(3)[:6]
    encode_texts(model, ByteTokenizer(), texts, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and f"6/{len(texts)} texts" in err


def test_length_buckets_properties():
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(0, 60)
        lengths = [rng.choice([1, 2, rng.randint(1, 400), rng.randint(1, 40)]) for _ in range(n)]
        budget = rng.choice([1, 7, 64, 400, 1000, 10_000])
        max_pad = rng.choice([0.0, 0.25, 0.5, 1.0])
        buckets = length_buckets(lengths, budget, max_pad)
        flat = [i for b in buckets for i in b]
        assert sorted(flat) == list(range(n)), "every index exactly once"
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True), "sorted by length, longest first"
        for k, b in enumerate(buckets):
            width = max(lengths[i] for i in b)
            assert width == lengths[b[0]]
            assert width * len(b) <= budget or len(b) == 1, f"trial {trial}: bucket {k} over budget"
            assert all(width - lengths[i] <= max_pad * width for i in b), f"trial {trial}: bucket {k} over-padded"
            if k + 1 < len(buckets):  # greedy: the next index did not fit
                nxt = lengths[buckets[k + 1][0]]
                assert width * (len(b) + 1) > budget or width - nxt > max_pad * width
    assert length_buckets([3, 10, 4, 9, 1], 20, max_pad=1.0) == [[1, 3], [2, 0, 4]]
    assert length_buckets([3, 10, 4, 9, 1], 20) == [[1, 3], [2, 0], [4]], "a row at most a quarter padding"
    assert length_buckets([500, 2, 2], 100) == [[0], [1, 2]], "an over-long length runs alone"
    assert length_buckets(torch.tensor([5, 5, 5]), 10) == [[0, 1], [2]]
    assert length_buckets([], 10) == []


def test_bad_input_is_a_clear_error(model):
    tok = ByteTokenizer()
    with pytest.raises(EmptyTextError, match=r"text 1 is empty \(no tokens\), and 1 more") as err:
        encode_texts(model, tok, ["a", "", "b", ""])
    assert err.value.indices == [1, 3] and isinstance(err.value, ValueError)
    with pytest.raises(TypeError, match="wrap it in a list"):
        encode_texts(model, tok, "one text")
    with pytest.raises(TypeError, match="text 1 is a int"):
        encode_texts(model, tok, ["a", 3])
    with pytest.raises(ValueError, match="batch_tokens must be an int >= 1"):
        encode_texts(model, tok, ["a"], batch_tokens=0)
    with pytest.raises(ValueError, match=r"lengths must be ints >= 1; entries \[1\]"):
        length_buckets([3, 0], 10)
    with pytest.raises(ValueError, match=r"max_pad must be a number in \[0, 1\]"):
        length_buckets([3], 10, max_pad=1.5)
    two = model.encode(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(StateMismatchError, match="must have batch 1"):
        encode_texts(model, tok, ["a"], state=two)
    other = (_mamba2 if model.arch == "mamba1" else _mamba1)().zero_state(1)
    with pytest.raises(StateMismatchError):
        encode_texts(model, tok, ["a"], state=other)
    assert encode_texts(model, tok, []) == []
