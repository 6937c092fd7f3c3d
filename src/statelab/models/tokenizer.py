"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``encode_batch(texts) -> (ids [B, T],
lengths [B])``, ``decode(list[int]) -> str``, ``vocab_size``, ``eos_token_id``, ``bos_token_id``, ``pad_token_id``
and ``fingerprint`` (a hash that changes whenever the mapping does, so a stored state can say which tokenizer
produced its tokens).

* ``ByteTokenizer``: UTF-8 bytes are ids 0-255, then PAD, BOS, EOS; for the small models trained here.
  Saved as ``statelab_tokenizer.json``.
* ``HFTokenizer``: a ``tokenizer.json`` read with the ``tokenizers`` library (the GPT-NeoX tokenizer of the
  Mamba checkpoints, for instance), or a byte-level BPE directory with ``vocab.json`` + ``merges.txt`` (GPT-2 /
  GPT-NeoX layout) built the way transformers builds it.

``load_tokenizer(path)`` picks the right one from a checkpoint directory, a tokenizer file, ``"embedded"`` or
``"byte"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from statelab.errors import CheckpointError
from statelab.fileio import read_json_object

if TYPE_CHECKING:
    import torch

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "has_tokenizer",
    "BYTE_TOKENIZER_FILE",
    "BYTE_LEVEL_BPE_CLASSES",
]

BYTE_TOKENIZER_FILE = "statelab_tokenizer.json"

# transformers tokenizer classes whose vocab.json + merges.txt statelab rebuilds, with the special tokens each
# class assumes when the configs name none and whether it NFC-normalises text first (GPT-NeoX does).
BYTE_LEVEL_BPE_CLASSES: dict[str, tuple[dict[str, str], bool]] = {
    "GPT2Tokenizer": ({"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}, False),
    "GPTNeoXTokenizer": (
        {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|padding|>"},
        True,
    ),
}
# The order in which transformers registers named special tokens (new ones get the next free ids in this order).
_SPECIAL_KEYS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@runtime_checkable
class Tokenizer(Protocol):
    """What statelab needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def fingerprint(self) -> str: ...


def _check_texts(texts: Sequence[str], who: str) -> list[str]:
    """``texts`` as a list, after refusing a bare string, an empty batch and non-string rows."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{who}.encode_batch expects a list of texts, got one {type(texts).__name__}; wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{who}.encode_batch got no texts: a batch needs at least one row")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{who}.encode_batch expects str rows, texts[{i}] is {type(t).__name__}")
    return texts


def _right_pad(flat: Any, lengths: list[int], fill: int, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], lengths [B])`` from ``flat``, an int64 array of all rows' ids one after another.

    ``first``: an id put in front of every row (BOS), counted in the returned lengths. Rows of zero tokens are
    refused here, since a model needs at least one real token per row (``lengths`` in ``[1, T]``).
    """
    import torch

    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty and first is None:
        shown = ", ".join(f"texts[{i}]" for i in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(f"{shown} gives no tokens (an empty text?): every row needs at least one token")
    lens = torch.tensor(lengths, dtype=torch.long)
    off = 0 if first is None else 1
    lens = lens + off
    T = int(lens.max())
    ids = torch.full((len(lengths), T), fill, dtype=torch.long)
    if first is not None:
        ids[:, 0] = first
    pos = torch.arange(T)
    # a boolean mask assigns in row-major order, which is exactly the order of the rows in ``flat``
    ids[(pos >= off) & (pos < lens[:, None])] = torch.as_tensor(flat, dtype=torch.long)
    return ids, lens


class ByteTokenizer:
    """Bytes 0-255 as ids 0-255, then ``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([257, 104, 195, 169, 258])
    'hé'
    >>> ids, lengths = tok.encode_batch(["hé", "a"])
    >>> ids.tolist(), lengths.tolist()
    ([[104, 195, 169], [97, 256, 256]], [3, 1])
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """UTF-8 bytes of ``text``, optionally framed by BOS and EOS."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``B`` texts at once: ``(ids [B, T] int64, lengths [B] int64)``, right-padded with PAD (256).

        Row ``b`` is ``encode(texts[b], add_bos=add_bos)`` followed by padding; ``T = max(lengths)``. The models
        mask padding by ``lengths``, so the padding id never changes a result. Raises ``ValueError`` for an empty
        batch or a row with no tokens (an empty text without ``add_bos``), naming the row.
        """
        import numpy as np

        rows = [t.encode("utf-8") for t in _check_texts(texts, "ByteTokenizer")]
        flat = np.frombuffer(b"".join(rows), dtype=np.uint8).astype(np.int64)
        return _right_pad(flat, [len(r) for r in rows], self.pad_token_id, self.bos_token_id if add_bos else None)

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids (special ids dropped; invalid UTF-8 becomes U+FFFD)."""
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, object]:
        return {
            "type": "byte",
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vocab_size": self.vocab_size,
        }

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``statelab_tokenizer.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        f = d / BYTE_TOKENIZER_FILE
        f.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return f

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` behind the statelab interface, from ``tokenizer.json`` or, with
    :meth:`from_bpe_files`, from ``vocab.json`` + ``merges.txt``.

    For ``tokenizer.json``, special ids come from ``special_tokens_map.json`` / ``tokenizer_config.json`` (token
    strings; the first wins where both name one, as in transformers) and ``config.json`` (ids) in the same
    directory when present, else from well-known special tokens in the vocabulary (``<|endoftext|>``, ``</s>``,
    ``<eos>``...). :meth:`from_bpe_files` takes them from the configs and the tokenizer class, as transformers
    does.
    """

    def __init__(self, tokenizer_file: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _Tok

        f = Path(tokenizer_file)
        try:
            tok = _Tok.from_file(str(f))
        except Exception as e:  # the tokenizers library raises its own exception type for unreadable files
            raise CheckpointError(f"cannot read tokenizer {f}: {e}") from e
        # the fingerprint hashes the file as written, so the same tokenizer.json always gives the same one
        self._setup(tok, f.read_text(), f.parent)

    def _setup(self, tok: Any, canonical: str, directory: Path, named: dict[str, str] | None = None) -> None:
        """``named``: the special tokens by role, when the loader knows them all (no guessing then)."""
        self._tok = tok
        self._json = canonical
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if named is not None:
            self.eos_token_id, self.bos_token_id, self.pad_token_id = (
                None if named.get(k) is None else tok.token_to_id(named[k]) for k in ("eos", "bos", "pad")
            )
            return
        extra = _special_ids_from_configs(directory, tok)
        self.eos_token_id = extra.get("eos", self._first_id(["<|endoftext|>", "</s>", "<eos>", "<|eos|>"]))
        self.bos_token_id = extra.get("bos", self._first_id(["<|startoftext|>", "<s>", "<bos>"]))
        self.pad_token_id = extra.get("pad", self._first_id(["<|padding|>", "<pad>"]))

    @classmethod
    def from_bpe_files(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Byte-level BPE from ``directory/vocab.json`` + ``merges.txt``, the GPT-2 / GPT-NeoX layout.

        Built as transformers' ``GPT2Tokenizer`` / ``GPTNeoXTokenizer`` build it, so the ids are the same: a BPE
        model with a ``ByteLevel`` pre-tokenizer (``add_prefix_space`` from ``tokenizer_config.json``, default
        false) and decoder, NFC normalisation for GPT-NeoX, the added tokens of ``tokenizer_config.json``'s
        ``added_tokens_decoder`` (or a legacy ``added_tokens.json``) at their ids, and the named special tokens
        (``special_tokens_map.json``, else ``tokenizer_config.json``, else the class's defaults such as
        ``<|endoftext|>``) matched whole in text; a special token missing from the vocabulary gets the next id.

        Raises ``CheckpointError`` for unreadable files, a ``tokenizer_class`` that is not byte-level BPE, or an
        added token whose stated id does not match.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        d = Path(directory)
        vocab, merges = d / "vocab.json", d / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise CheckpointError(f"no {f.name} in {d}: a byte-level BPE tokenizer needs vocab.json + merges.txt")
        config = _read_json_object(d / "tokenizer_config.json")
        special_map = _read_json_object(d / "special_tokens_map.json")
        cls_name = str(config.get("tokenizer_class") or "GPT2Tokenizer").removesuffix("Fast")
        if cls_name not in BYTE_LEVEL_BPE_CLASSES:
            raise CheckpointError(
                f"{d / 'tokenizer_config.json'} names tokenizer_class {config['tokenizer_class']!r}; statelab reads "
                f"vocab.json + merges.txt only as byte-level BPE ({', '.join(sorted(BYTE_LEVEL_BPE_CLASSES))}); "
                "save the tokenizer as tokenizer.json (transformers' save_pretrained writes one)"
            )
        defaults, nfc = BYTE_LEVEL_BPE_CLASSES[cls_name]
        try:
            bpe = BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # the tokenizers library raises its own exception type for unreadable files
            raise CheckpointError(f"cannot read {vocab} + {merges}: {e}") from e
        tok = Tokenizer(bpe)
        if nfc:
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
        tok.decoder = decoders.ByteLevel()

        for i, spec in _added_tokens(d, config):
            t = AddedToken(
                spec["content"],
                single_word=bool(spec.get("single_word", False)),
                lstrip=bool(spec.get("lstrip", False)),
                rstrip=bool(spec.get("rstrip", False)),
                normalized=bool(spec.get("normalized", not spec.get("special", False))),
                special=bool(spec.get("special", False)),
            )
            (tok.add_special_tokens if t.special else tok.add_tokens)([t])
            got = tok.token_to_id(t.content)
            if got != i:
                raise CheckpointError(
                    f"{d}: added token {t.content!r} is stated to have id {i} but gets {got} after vocab.json's "
                    f"{tok.get_vocab_size(with_added_tokens=False)} entries and the added tokens before it"
                )
        named, extra = _named_special_tokens(config, special_map, defaults)
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in [*named.values(), *extra]])

        out = cls.__new__(cls)
        # the serialised tokenizer holds everything that decides the ids (vocab, merges, added tokens, pre-tokenizer)
        out._setup(tok, tok.to_str(), d, named)
        return out

    def _first_id(self, names: list[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens added, except BOS in front with ``add_bos``)."""
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
        return self._bos(add_bos) + list(self._tok.encode(text, add_special_tokens=False).ids)

    def _bos(self, add_bos: bool) -> list[int]:
        if not add_bos:
            return []
        if self.bos_token_id is None:
            raise ValueError("this tokenizer has no BOS token: call without add_bos (or name one in its configs)")
        return [self.bos_token_id]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``B`` texts at once with the ``tokenizers`` library's batch encoder (parallel in Rust).

        Returns ``(ids [B, T] int64, lengths [B] int64)``: row ``b`` is ``encode(texts[b], add_bos=add_bos)``
        then padding up to ``T = max(lengths)``. Padding uses ``pad_token_id``; a tokenizer without a pad token
        pads with ``eos_token_id``, or id 0 when it has neither. The models mask padding by ``lengths``, so the
        padding id never changes a result. Raises ``ValueError`` for an empty batch, a row with no tokens (an
        empty text without ``add_bos``), naming the row, or ``add_bos`` without a BOS token.
        """
        from itertools import chain

        import numpy as np

        texts = _check_texts(texts, "HFTokenizer")
        first = self._bos(add_bos)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # the fast one skips offsets
        rows = [e.ids for e in encode(texts, add_special_tokens=False)]
        lengths = [len(r) for r in rows]
        flat = np.fromiter(chain.from_iterable(rows), np.int64, count=sum(lengths))  # 3x faster than a list
        fill = next((i for i in (self.pad_token_id, self.eos_token_id) if i is not None), 0)
        return _right_pad(flat, lengths, fill, first[0] if first else None)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token_id})"


def _read_json_object(f: Path) -> dict[str, Any]:
    """The JSON object in ``f``, ``{}`` when the file is absent; ``CheckpointError`` when it is not an object."""
    return read_json_object(f) if f.is_file() else {}


def _token_text(v: Any) -> str | None:
    """A token string from a config value: a string or an ``AddedToken`` dict with ``content``."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _named_special_tokens(
    config: dict[str, Any], special_map: dict[str, Any], defaults: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """``({"bos": text, ...}, [additional special tokens])`` in transformers' registration order.

    A named token comes from ``special_tokens_map.json``, else ``tokenizer_config.json``, else the class default.
    """
    named: dict[str, str] = {}
    for key in _SPECIAL_KEYS:
        name = f"{key}_token"
        text = _token_text(special_map.get(name)) or _token_text(config.get(name)) or defaults.get(key)
        if text is not None:
            named[key] = text
    extra: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        listed = special_map.get(key) or config.get(key) or []
        for v in listed if isinstance(listed, list) else []:
            text = _token_text(v)
            if text is not None and text not in extra:
                extra.append(text)
    return named, extra


def _added_tokens(directory: Path, config: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(id, AddedToken fields)`` by id from ``added_tokens_decoder`` or a legacy ``added_tokens.json``."""
    decoder = config.get("added_tokens_decoder")
    found: list[tuple[int, dict[str, Any]]] = []
    if isinstance(decoder, dict):
        for k, v in decoder.items():
            if not (str(k).isdigit() and isinstance(v, dict) and _token_text(v)):
                raise CheckpointError(f"{directory / 'tokenizer_config.json'}: bad added_tokens_decoder entry {k!r}")
            found.append((int(k), v))
    else:
        legacy = _read_json_object(directory / "added_tokens.json")
        for text, i in legacy.items():
            if not isinstance(i, int):
                raise CheckpointError(f"{directory / 'added_tokens.json'}: id of {text!r} must be an integer")
            found.append((i, {"content": text, "normalized": True, "special": False}))
    return sorted(found, key=lambda p: p[0])


def _special_ids_from_configs(directory: Path, tok) -> dict[str, int]:
    """``{"eos"|"bos"|"pad": id}`` from ``special_tokens_map.json`` / ``tokenizer_config.json`` (token strings)
    or ``config.json`` (ids)."""
    out: dict[str, int] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            cfg = _read_json_object(directory / name)
        except CheckpointError:
            cfg = {}
        for key in ("eos", "bos", "pad"):
            v = _token_text(cfg.get(f"{key}_token"))
            if key not in out and v is not None and tok.token_to_id(v) is not None:
                out[key] = tok.token_to_id(v)
    try:
        cfg = _read_json_object(directory / "config.json")
    except CheckpointError:
        cfg = {}
    for key in ("eos", "bos", "pad"):
        v = cfg.get(f"{key}_token_id")
        if key not in out and isinstance(v, int):
            out[key] = v
    return out


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds tokenizer files ``load_tokenizer`` reads."""
    d = Path(directory)
    return (d / BYTE_TOKENIZER_FILE).is_file() or (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory or a tokenizer file.

    ``path`` may be:

    * ``"byte"``: statelab's :class:`ByteTokenizer` (a directory called ``byte`` is ``./byte``);
    * ``"embedded"``: the tokenizer of the model shipped in the package;
    * a directory holding ``statelab_tokenizer.json``, ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
      (looked for in that order);
    * one of those files (``vocab.json`` / ``merges.txt`` stand for their directory's pair).

    Raises ``CheckpointError`` when there is none or it cannot be read.
    """
    if str(path) == "byte":
        return ByteTokenizer()
    if str(path) == "embedded":
        from statelab.models.loading import embedded_dir

        p = embedded_dir()
    else:
        p = Path(path).expanduser()
    if p.is_file() and p.name in ("vocab.json", "merges.txt"):
        return HFTokenizer.from_bpe_files(p.parent)
    if p.is_file():
        candidates = [p]
    elif p.is_dir():
        candidates = [p / BYTE_TOKENIZER_FILE, p / "tokenizer.json"]
    else:
        raise CheckpointError(f"no tokenizer: {p} does not exist")
    for f in candidates:
        if not f.is_file():
            continue
        if f.name == BYTE_TOKENIZER_FILE:
            try:
                spec = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{f} is not valid JSON: {e}") from e
            tok = ByteTokenizer()
            if spec != tok.to_dict():
                raise CheckpointError(f"{f} describes {spec}, not statelab's byte tokenizer {tok.to_dict()}")
            return tok
        return HFTokenizer(f)
    if (p / "vocab.json").is_file():
        return HFTokenizer.from_bpe_files(p)
    raise CheckpointError(
        f"no tokenizer in {p}: expected {BYTE_TOKENIZER_FILE}, tokenizer.json or vocab.json + merges.txt"
    )
