"""Tokenizers: byte round trip, tokenizer.json through `tokenizers`, loading from a directory, errors."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from statelab.errors import CheckpointError
from statelab.models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "state soup: ∑Δ über alles 🍲"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.encode("A") == [65]
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([300])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_byte_save_load(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, ByteTokenizer) and back.fingerprint == tok.fingerprint
    (tmp_path / "statelab_tokenizer.json").write_text(json.dumps({"type": "byte", "vocab_size": 300}))
    with pytest.raises(CheckpointError, match="not statelab's byte tokenizer"):
        load_tokenizer(tmp_path)


def _word_level(tmp_path):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3, "state": 4}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    return t


def test_tokenizer_json(tmp_path):
    _word_level(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello state world") == [2, 4, 3]
    assert tok.decode([2, 4, 0]) == "hello state"
    assert tok.eos_token_id == 0 and tok.vocab_size == 5
    fp = tok.fingerprint
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    tok2 = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok2.eos_token_id == 3 and tok2.fingerprint == fp


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
