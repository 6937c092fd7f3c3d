"""Tokenizers: byte round trip, tokenizer.json through `tokenizers`, loading from a directory, errors; batches;
byte-level BPE from vocab.json + merges.txt against transformers."""

import json
import unicodedata

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


# ---- batches --------------------------------------------------------------------------------------------------
BATCH = ["hello", "é", "a longer row: ∑Δ 🍲", "x"]


def _check_batch(tok, texts, add_bos=False):
    ids, lengths = tok.encode_batch(texts, add_bos=add_bos)
    rows = [tok.encode(t, add_bos=add_bos) for t in texts]
    assert ids.dtype == lengths.dtype == torch.long
    assert lengths.tolist() == [len(r) for r in rows] and ids.shape == (len(texts), max(map(len, rows)))
    for b, r in enumerate(rows):
        assert ids[b, : len(r)].tolist() == r
    return ids, lengths


def test_byte_encode_batch():
    tok = ByteTokenizer()
    ids, lengths = _check_batch(tok, BATCH)
    assert (ids[1, 2:] == tok.pad_token_id).all() and int(lengths[1]) == 2
    ids, lengths = _check_batch(tok, ["", *BATCH], add_bos=True)  # BOS makes an empty text one token
    assert ids[:, 0].eq(tok.bos_token_id).all() and int(lengths[0]) == 1
    assert ids[0, 1:].eq(tok.pad_token_id).all()


@pytest.mark.parametrize(
    "texts, error, message",
    [
        (["a", "", "b", ""], ValueError, r"texts\[1\], texts\[3\] gives no tokens"),
        ([], ValueError, "no texts"),
        ("abc", TypeError, "list of texts"),
        (["a", 3], TypeError, r"texts\[1\] is int"),
    ],
    ids=["empty-text", "empty-batch", "bare-string", "not-a-string"],
)
def test_encode_batch_refuses(tmp_path, texts, error, message):
    for tok in (ByteTokenizer(), _bpe(tmp_path)):
        with pytest.raises(error, match=message):
            tok.encode_batch(texts)


def test_hf_encode_batch_pads_with_pad_else_eos(tmp_path):
    tok = _bpe(tmp_path, "GPTNeoXTokenizer")  # has <|padding|>
    ids, lengths = _check_batch(tok, BATCH)
    pad = torch.arange(ids.shape[1]) >= lengths[:, None]
    assert pad.any() and ids[pad].eq(tok.pad_token_id).all() and tok.pad_token_id != tok.eos_token_id
    _check_batch(tok, ["", *BATCH], add_bos=True)
    gpt2 = _bpe(tmp_path / "gpt2")  # no pad token: padding uses EOS
    ids, lengths = _check_batch(gpt2, BATCH)
    assert gpt2.pad_token_id is None and ids[pad].eq(gpt2.eos_token_id).all()
    (tmp_path / "words").mkdir()
    _word_level(tmp_path / "words")  # neither BOS nor pad
    words = load_tokenizer(tmp_path / "words")
    _check_batch(words, ["hello world", "state"])
    with pytest.raises(ValueError, match="no BOS token"):
        words.encode_batch(["hello"], add_bos=True)


# ---- byte-level BPE from vocab.json + merges.txt ---------------------------------------------------------------
CORPUS = [
    "The state of a Mamba model summarises everything it has read.",
    "Hello world, hello state soup! Skills are states; soups mix them.",
    "naïve café über alles 🍲 日本語\n\nTabs\tand  two spaces, e\u0301 decomposed",
]
TEXTS = [
    "Hello world",
    " leading space",
    "trailing spaces   ",
    "many    spaces   inside",
    "new\nlines\n\nand\r\ncrlf\n",
    "\ttabs\t",
    "naïve café über 🍲 日本語 ∑Δ",
    "unseen: ωψ ☃ 𝔘",
    "e\u0301 and é",
    "state soup",
]


def write_byte_level_bpe(directory, tokenizer_class="GPT2Tokenizer", vocab_size=320, **config):
    """Train a tiny byte-level BPE on CORPUS and save it as vocab.json + merges.txt + tokenizer_config.json (and
    the same tokenizer as ``directory/json/tokenizer.json``). Returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.model.save(str(directory))
    (directory / "json").mkdir(exist_ok=True)
    tok.save(str(directory / "json" / "tokenizer.json"))
    cfg = {"tokenizer_class": tokenizer_class, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def _bpe(directory, tokenizer_class="GPT2Tokenizer", **config):
    return load_tokenizer(write_byte_level_bpe(directory, tokenizer_class, **config))


@pytest.mark.parametrize(
    "tokenizer_class, config, special_map",
    [
        ("GPT2Tokenizer", {}, None),
        ("GPTNeoXTokenizer", {}, None),
        ("GPT2TokenizerFast", {"add_prefix_space": True, "pad_token": "<pad>", "eos_token": "<|padding|>"}, None),
        ("GPT2Tokenizer", {"pad_token": "<pad>"}, {"pad_token": "<p>", "bos_token": {"content": "<s>"}}),
    ],
    ids=["gpt2", "neox", "prefix-space", "special-tokens-map"],
)
def test_bpe_files_equal_transformers(tmp_path, tokenizer_class, config, special_map):
    from transformers import AutoTokenizer

    d = write_byte_level_bpe(tmp_path, tokenizer_class, **config)
    if special_map is not None:
        (d / "special_tokens_map.json").write_text(json.dumps(special_map))
    ref = AutoTokenizer.from_pretrained(str(d))
    tok = load_tokenizer(d)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(ref)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id
    )  # fmt: skip
    nfc = tokenizer_class.startswith("GPTNeoX")
    prefix = config.get("add_prefix_space", False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        want = unicodedata.normalize("NFC", text) if nfc else text
        want = " " + want if prefix and not want.startswith(" ") else want  # the space it adds is decoded too
        assert tok.decode(ids) == want == ref.decode(ids), text
    # special tokens are matched whole in text, as transformers does
    text = "a<|endoftext|>b<pad><p><s>c"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    ids, lengths = tok.encode_batch(TEXTS)
    assert ids[3, : lengths[3]].tolist() == ref.encode(TEXTS[3], add_special_tokens=False)


def test_bpe_files_equal_tokenizer_json(tmp_path):
    d = write_byte_level_bpe(tmp_path / "bpe")
    files, single = load_tokenizer(d), load_tokenizer(d / "json" / "tokenizer.json")
    assert all(files.encode(t) == single.encode(t) for t in TEXTS)
    assert load_tokenizer(d / "vocab.json").fingerprint == files.fingerprint  # a file of the pair stands for it


def test_bpe_fingerprints(tmp_path):
    fp = _bpe(tmp_path / "a").fingerprint
    assert load_tokenizer(tmp_path / "a").fingerprint == fp  # stable for the same files
    assert _bpe(tmp_path / "b").fingerprint == fp  # and for the same tokenizer trained again
    others = [
        _bpe(tmp_path / "c", vocab_size=300),
        _bpe(tmp_path / "d", "GPTNeoXTokenizer"),
        _bpe(tmp_path / "e", add_prefix_space=True),
        _bpe(tmp_path / "f", pad_token="<pad>"),
        load_tokenizer(tmp_path / "a" / "json"),
        ByteTokenizer(),
    ]
    fps = [fp, *(t.fingerprint for t in others)]
    assert len(set(fps)) == len(fps)


def test_bpe_files_errors(tmp_path):
    d = write_byte_level_bpe(tmp_path / "x")
    (d / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="no merges.txt"):
        load_tokenizer(d)
    d = write_byte_level_bpe(tmp_path / "bert", "BertTokenizer")
    with pytest.raises(CheckpointError, match="tokenizer_class 'BertTokenizer'.*byte-level BPE"):
        load_tokenizer(d)
    added = {"5": {"content": "<x>", "special": False}}  # id 5 is a byte in vocab.json
    d = write_byte_level_bpe(tmp_path / "added", added_tokens_decoder=added)
    with pytest.raises(CheckpointError, match="'<x>' is stated to have id 5"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tokenizer(d)


def test_added_tokens_at_their_ids(tmp_path):
    from transformers import AutoTokenizer

    d = write_byte_level_bpe(tmp_path)
    n = json.loads((d / "vocab.json").read_text()).__len__()
    (d / "added_tokens.json").write_text(json.dumps({"<x>": n, "<y>": n + 1}))
    tok, ref = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    text = "a<x>b <y> c"
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False) and n in tok.encode(text)


def test_byte_by_name():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
