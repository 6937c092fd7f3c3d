"""Tokenizers behind one small interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size``, ``eos_token_id``, ``bos_token_id``, ``pad_token_id`` and ``fingerprint`` (a hash that changes
whenever the mapping does, so a stored state can say which tokenizer produced its tokens).

* ``ByteTokenizer``: UTF-8 bytes are ids 0-255, then PAD, BOS, EOS; for the small models trained here.
  Saved as ``statelab_tokenizer.json``.
* ``HFTokenizer``: a ``tokenizer.json`` read with the ``tokenizers`` library (the GPT-NeoX tokenizer of the
  Mamba checkpoints, for instance).

``load_tokenizer(path)`` picks the right one from a checkpoint directory (or ``"embedded"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from statelab.errors import CheckpointError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "BYTE_TOKENIZER_FILE"]

BYTE_TOKENIZER_FILE = "statelab_tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What statelab needs from a tokenizer."""

    vocab_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    @property
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """Bytes 0-255 as ids 0-255, then ``PAD = 256``, ``BOS = 257``, ``EOS = 258`` (``vocab_size = 259``).

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([257, 104, 195, 169, 258])
    'hé'
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
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` behind the statelab interface.

    Special ids come from ``tokenizer_config.json`` / ``config.json`` in the same directory when present, else
    from well-known special tokens in the vocabulary (``<|endoftext|>``, ``</s>``, ``<eos>``...).
    """

    def __init__(self, tokenizer_file: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as _Tok

        f = Path(tokenizer_file)
        try:
            self._tok = _Tok.from_file(str(f))
        except Exception as e:  # the tokenizers library raises its own exception type for unreadable files
            raise CheckpointError(f"cannot read tokenizer {f}: {e}") from e
        self._json = f.read_text()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        extra = _special_ids_from_configs(f.parent, self._tok)
        self.eos_token_id = extra.get("eos", self._first_id(["<|endoftext|>", "</s>", "<eos>", "<|eos|>"]))
        self.bos_token_id = extra.get("bos", self._first_id(["<|startoftext|>", "<s>", "<bos>"]))
        self.pad_token_id = extra.get("pad", self._first_id(["<|padding|>", "<pad>"]))

    def _first_id(self, names: list[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token_id})"


def _special_ids_from_configs(directory: Path, tok) -> dict[str, int]:
    """``{"eos"|"bos"|"pad": id}`` from ``tokenizer_config.json`` (token strings) or ``config.json`` (ids)."""
    out: dict[str, int] = {}
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        try:
            cfg = json.loads(tc.read_text())
        except json.JSONDecodeError:
            cfg = {}
        for key in ("eos", "bos", "pad"):
            v = cfg.get(f"{key}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and tok.token_to_id(v) is not None:
                out[key] = tok.token_to_id(v)
    mc = directory / "config.json"
    if mc.is_file():
        try:
            cfg = json.loads(mc.read_text())
        except json.JSONDecodeError:
            cfg = {}
        for key in ("eos", "bos", "pad"):
            v = cfg.get(f"{key}_token_id")
            if key not in out and isinstance(v, int):
                out[key] = v
    return out


def load_tokenizer(path: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory (or a ``tokenizer.json`` / ``statelab_tokenizer.json`` file).

    ``"embedded"`` names the model shipped in the package. Raises ``CheckpointError`` when there is none.
    """
    if str(path) == "embedded":
        from statelab.models.loading import embedded_dir

        p = embedded_dir()
    else:
        p = Path(path).expanduser()
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
    raise CheckpointError(f"no tokenizer in {p}: expected {BYTE_TOKENIZER_FILE} or tokenizer.json")
