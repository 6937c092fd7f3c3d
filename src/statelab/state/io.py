"""State files: one ``State`` as a safetensors file with string metadata, written atomically, verified on load.

A state file holds three tensors, ``ssm``, ``conv`` and ``sum_delta`` (shapes in :mod:`statelab.state.core`),
and these metadata keys (all strings, as safetensors requires):

| key                | value                                                                      |
|--------------------|----------------------------------------------------------------------------|
| ``format``         | ``"statelab.state"``                                                       |
| ``format_version`` | ``"1"``; a reader refuses versions it does not know                        |
| ``statelab_version`` | the version that wrote the file                                          |
| ``arch``           | ``"mamba1"`` or ``"mamba2"``                                               |
| ``fingerprint``    | the fingerprint of the model that made the state (config and weights hash) |
| ``dtype``          | dtype of ``ssm`` and ``conv`` (``sum_delta`` is always float32)            |
| ``layout``         | JSON: per-sequence shapes of each part, e.g. ``{"ssm": [D, N], ...}``       |
| ``num_layers``, ``batch_size``, ``conv_width`` | integers (``conv_width`` = K - 1) |
| ``n_tokens``       | an integer if every row consumed the same number of tokens, else a JSON list of per-row counts |
| ``prompt``, ``token_ids``, ``tokenizer_hash``, ``extra`` | optional; ``token_ids`` and ``extra`` are JSON |
| ``checksum``       | ``sha256:<hex>`` over the other metadata and the tensor bytes (see below)   |

The checksum is SHA-256 over the canonical JSON of all other metadata (sorted keys, no spaces), then for each of
``ssm``, ``conv``, ``sum_delta`` in that order: ``name|dtype|shape|`` and the tensor's raw little-endian bytes.
The writer emits the safetensors header as canonical JSON too (sorted keys, tensors stored in that order), so the
same state and metadata always give the same file bytes and the checksum is also a content address (the state
store names its blobs by it). Files are read back with the safetensors library, which validates the layout.

No pickle is involved anywhere: safetensors stores raw tensor bytes and a JSON header.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from statelab.errors import StateFileError, StateMismatchError
from statelab.fileio import fsync_dir
from statelab.state.core import ARCH_SSM_RANK, State

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save_state",
    "load_state",
    "read_metadata",
    "encode_state",
    "decode_state",
    "atomic_write",
    "TMP_PREFIX",
]

FORMAT = "statelab.state"
FORMAT_VERSION = "1"
PARTS = ("ssm", "conv", "sum_delta")
TMP_PREFIX = ".tmp-"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_REQUIRED = (
    "format",
    "format_version",
    "statelab_version",
    "arch",
    "fingerprint",
    "dtype",
    "layout",
    "num_layers",
    "batch_size",
    "n_tokens",
    "conv_width",
    "checksum",
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over the canonical metadata (without ``checksum``) and the tensor bytes, see module doc."""
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in PARTS:
        t = tensors[name].contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header: sorted keys, tensors in ``PARTS`` order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name in PARTS:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    parts = [len(head).to_bytes(8, "little"), head]
    parts += [t.view(torch.uint8).numpy().tobytes() for name in PARTS if (t := tensors[name]).numel()]
    return b"".join(parts)


def _all_finite(t: torch.Tensor) -> bool:
    # numpy runs single-threaded: on a busy machine a threaded torch reduction over a few MB can stall for a whole
    # scheduler slice waiting for its second thread, which would dominate save/load latency.
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(t.detach().contiguous().numpy()).all())
    return bool(torch.isfinite(t).all())


def _check_finite(state: State, what: str) -> None:
    for name in PARTS:
        t = getattr(state, name)
        if not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise StateFileError(f"{what}: state part {name!r} holds {bad} NaN/inf values; refusing a broken state")


def encode_state(
    state: State,
    *,
    prompt: str | None = None,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    tokenizer_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The bytes of a state file and its metadata (``checksum`` included), without touching the disk.

    Raises ``StateFileError`` for a state holding NaN or inf, or metadata that cannot be stored.
    """
    if not isinstance(state, State):
        raise StateFileError(f"save_state needs a statelab.State, got {type(state).__name__}")
    _check_finite(state, "save_state")
    from statelab import __version__

    meta: dict[str, str] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "statelab_version": __version__,
        "arch": state.arch,
        "fingerprint": state.fingerprint,
        "dtype": _dtype_name(state.dtype),
        "layout": json.dumps(state.layout, sort_keys=True),
        "num_layers": str(state.num_layers),
        "batch_size": str(state.batch_size),
        "n_tokens": str(state.n_tokens) if not state.ragged else json.dumps(list(state.tokens)),
        "conv_width": str(state.conv.shape[-1]),
    }
    if prompt is not None:
        meta["prompt"] = str(prompt)
    if token_ids is not None:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        meta["token_ids"] = json.dumps([int(i) for i in ids])
    if tokenizer_hash is not None:
        meta["tokenizer_hash"] = str(tokenizer_hash)
    if extra is not None:
        try:
            meta["extra"] = json.dumps(extra, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StateFileError(f"save_state: extra metadata must be JSON-serialisable: {e}") from None
    tensors = {name: getattr(state, name).detach().to("cpu").contiguous() for name in PARTS}
    meta["checksum"] = _checksum(meta, tensors)
    if state.dtype not in _ST_DTYPES:
        raise StateFileError(f"save_state: unsupported state dtype {state.dtype}; known: {sorted(_DTYPES)}")
    return _serialize(tensors, meta), meta


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    A temporary file ``.tmp-<pid>-<random>-<name>`` in the same directory is written and fsynced, renamed over
    ``path`` and the directory fsynced. ``fsync=False`` skips both fsyncs: the write stays atomic for readers and
    against a crashed process, but a power loss may lose it. On failure (full disk, quota, permissions) the
    temporary file is removed and ``StateFileError`` names the path and the reason; ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or type(e).__name__)
        raise StateFileError(f"could not write {path}: {reason} (errno {e.errno}); nothing was written") from None


def save_state(
    state: State,
    path: str | os.PathLike,
    *,
    prompt: str | None = None,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    tokenizer_hash: str | None = None,
    extra: dict[str, Any] | None = None,
    fsync: bool = True,
) -> Path:
    """Write ``state`` to ``path`` (safetensors, atomically); returns the path.

    Args:
        state: the state to save; any batch size; must hold no NaN/inf.
        prompt: optional text the state was encoded from.
        token_ids: optional token ids the state consumed.
        tokenizer_hash: optional hash of the tokenizer (and chat template) used to make ``token_ids``.
        extra: optional JSON-serialisable dict stored under ``extra``.
        fsync: make the file durable before returning (default). ``False`` is still atomic, but a power loss
            right after the call may lose the file; it saves the disk flush (most of the latency).

    Example:
        >>> save_state(state, "skill.safetensors", prompt="Q: 2+2\\nA: 4\\n")  # doctest: +SKIP
    """
    data, _ = encode_state(state, prompt=prompt, token_ids=token_ids, tokenizer_hash=tokenizer_hash, extra=extra)
    path = Path(path)
    if path.is_dir():
        raise StateFileError(f"cannot save a state to {path}: it is a directory")
    if not path.parent.is_dir():
        raise StateFileError(f"cannot save a state to {path}: directory {path.parent} does not exist")
    atomic_write(path, data, fsync=fsync)
    return path


# A header longer than this is not a state file's: a state header is a few hundred bytes plus the prompt.
_MAX_HEADER = 100 * 2**20


def _looks_like(data: bytes) -> str | None:
    """What a file that is not safetensors seems to be, from its first bytes (for the error message), or None."""
    if data.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save writes these)"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "a pickle"
    if data.startswith(b"\x93NUMPY"):
        return "a numpy .npy file"
    head = data[:512]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\n\r\t" for c in text):
        return "a text file"
    return None


def _not_a_state_file(data: bytes, source: str) -> StateFileError:
    kind = _looks_like(data)
    what = f"it looks like {kind}" if kind else "its first 8 bytes are not a safetensors header length"
    return StateFileError(
        f"{source}: not a state file: {what}. State files are safetensors files written by State.save or "
        "`statelab encode` (statelab never unpickles)"
    )


def _parse_header(data: bytes, source: str, size: int | None = None) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and its length.

    ``data``: the file's bytes, or (``read_metadata``) only its beginning, in which case ``size`` is the size of
    the whole file. A file that is not safetensors at all (pickle, zip, text) is named as such rather than
    reported as truncated.
    """
    size = len(data) if size is None else size
    if size == 0:
        raise StateFileError(f"{source}: empty file, not a state file")
    if size < 8:
        raise StateFileError(f"{source}: truncated state file ({size} bytes, not even a header length)")
    n = int.from_bytes(data[:8], "little")
    starts_json = data[8:9] == b"{"
    if not starts_json and (n > size - 8 or n > _MAX_HEADER or n < 2 or _looks_like(data)):
        raise _not_a_state_file(data, source)
    if n > _MAX_HEADER:
        raise _not_a_state_file(data, source)
    if n > size - 8:
        raise StateFileError(f"{source}: truncated state file (header says {n} bytes, file has {size - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StateFileError(f"{source}: corrupt state file header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise StateFileError(f"{source}: corrupt state file header (not a JSON object)")
    return header, n


def _metadata(header: dict[str, Any], source: str) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFileError(f"{source}: not a statelab state file (metadata 'format' is not {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StateFileError(
            f"{source}: unknown state file format version {version!r}; this statelab reads version {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise StateFileError(f"{source}: state file metadata lacks {missing}")
    not_str = sorted(k for k, v in meta.items() if not isinstance(v, str))
    if not_str:
        raise StateFileError(f"{source}: corrupt state file metadata ({not_str} are not strings)")
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a state file, read from its header only (not verified against the tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(4096)
            n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
            if 8 + n > len(data) and n <= min(size - 8, _MAX_HEADER):  # read only a header that is there
                data += f.read(8 + n - len(data))
    except FileNotFoundError:
        raise StateFileError(f"state file {path} does not exist") from None
    except OSError as e:
        raise StateFileError(f"cannot read state file {path}: {e.strerror or e}") from None
    header, _ = _parse_header(data, str(path), size)
    return _metadata(header, str(path))


def _as_int(meta: dict[str, str], key: str, source: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise StateFileError(f"{source}: metadata {key!r} is not an integer: {meta[key]!r}") from None


def _token_counts(meta: dict[str, str], source: str) -> int | list[int]:
    """``n_tokens`` metadata: one integer, or a JSON list of per-row integers (a ragged batch)."""
    raw = meta["n_tokens"]
    if raw.lstrip().startswith("["):
        try:
            counts = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            counts = None
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise StateFileError(f"{source}: metadata 'n_tokens' is not a list of integers: {raw!r}")
        return counts
    return _as_int(meta, "n_tokens", source)


def decode_state(data: bytes, source: str = "<bytes>") -> tuple[State, dict[str, str]]:
    """Parse and verify the bytes of a state file; returns the state (on CPU) and its metadata.

    Verifies, in order: header, format and version, the three tensors and their data length, the checksum, the
    declared dtype, layout, layer count and batch size against the tensors, and that no value is NaN or inf.
    Every failure raises ``StateFileError`` naming ``source``.
    """
    header, n = _parse_header(data, source)
    meta = _metadata(header, source)
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(PARTS):
        raise StateFileError(f"{source}: state file must hold tensors {list(PARTS)}, found {names}")
    try:
        end = max(int(header[k]["data_offsets"][1]) for k in PARTS)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        raise StateFileError(f"{source}: corrupt tensor entry in the state file header") from None
    body = len(data) - 8 - n
    if body < end:
        raise StateFileError(f"{source}: truncated state file (tensor data needs {end} bytes, file has {body})")
    if body > end:
        raise StateFileError(f"{source}: corrupt state file ({body - end} unexpected bytes after the tensor data)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise StateFileError(f"{source}: corrupt state file ({e})") from None
    want = meta["checksum"]
    got = _checksum(meta, tensors)
    if got != want:
        raise StateFileError(
            f"{source}: checksum mismatch (file says {want[:23]}, contents give {got[:23]}): the file is corrupt"
        )
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise StateFileError(f"{source}: unsupported state dtype {meta['dtype']!r}; known: {sorted(_DTYPES)}")
    for name, want_dtype in (("ssm", dtype), ("conv", dtype), ("sum_delta", torch.float32)):
        if tensors[name].dtype != want_dtype:
            raise StateFileError(
                f"{source}: tensor {name!r} has dtype {_dtype_name(tensors[name].dtype)}, "
                f"metadata declares {_dtype_name(want_dtype)}"
            )
    arch = meta["arch"]
    if arch not in ARCH_SSM_RANK:
        raise StateFileError(f"{source}: unknown architecture {arch!r}; known: {sorted(ARCH_SSM_RANK)}")
    try:
        layout = json.loads(meta["layout"])
    except (json.JSONDecodeError, RecursionError):
        raise StateFileError(f"{source}: metadata 'layout' is not JSON: {meta['layout'][:80]!r}") from None
    if not isinstance(layout, dict) or not all(
        isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for v in layout.values()
    ):
        raise StateFileError(f"{source}: metadata 'layout' is not a map of parts to shapes: {meta['layout'][:80]!r}")
    L = _as_int(meta, "num_layers", source)
    B = _as_int(meta, "batch_size", source)
    n_tokens = _token_counts(meta, source)
    for name in PARTS:
        want_shape = [L, B, *layout.get(name, [])]
        if list(tensors[name].shape) != want_shape:
            raise StateFileError(
                f"{source}: tensor {name!r} has shape {list(tensors[name].shape)}, metadata declares {want_shape}"
            )
    if tensors["conv"].shape[-1] != _as_int(meta, "conv_width", source):
        raise StateFileError(f"{source}: conv width {tensors['conv'].shape[-1]} != metadata {meta['conv_width']}")
    try:
        state = State(arch=arch, n_tokens=n_tokens, fingerprint=meta["fingerprint"], **tensors)
    except StateMismatchError as e:
        raise StateFileError(f"{source}: {e}") from None
    _check_finite(state, source)
    return state, meta


def _fingerprint_hint(model: Any, fingerprint: str) -> str:
    """The model's explanation of a fingerprint mismatch (the same checkpoint in another dtype), if it has one."""
    hint = getattr(model, "fingerprint_hint", None)
    return hint(fingerprint) if callable(hint) else ""


def load_state(
    path: str | os.PathLike,
    model: Any = None,
    *,
    device: torch.device | str | None = None,
) -> State:
    """Read and verify a state file; with ``model``, also refuse a state made by another model.

    Args:
        path: a file written by :func:`save_state`.
        model: optional ``StatefulLM``; the state's fingerprint, architecture and layout must match it.
        device: where to put the tensors (default CPU).

    Raises:
        StateFileError: missing, truncated or corrupt file, checksum mismatch, unknown format version, wrong
            dtype or shape, NaN/inf values.
        StateMismatchError: the state was made by another model (the message names both fingerprints) or does not
            fit ``model``'s layout.

    Example:
        >>> state = load_state("skill.safetensors", model)  # doctest: +SKIP
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateFileError(f"state file {path} does not exist") from None
    except OSError as e:
        raise StateFileError(f"cannot read state file {path}: {e.strerror or e}") from None
    state, _ = decode_state(data, str(path))
    if model is not None:
        mine = model.fingerprint
        if state.fingerprint != mine:
            raise StateMismatchError(
                f"{path}: state was made by model {state.fingerprint}, but this model's fingerprint is {mine}"
                + _fingerprint_hint(model, state.fingerprint)
            )
        model.check_state(state)
    if device is not None:
        state = state.to(device=device)
    return state
