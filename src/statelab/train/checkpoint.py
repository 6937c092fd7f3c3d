"""Training checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint is a directory ``<out_dir>/checkpoints/step-<8 digits>/`` holding

* ``model.safetensors``: the model's parameters and buffers (tied weights stored once);
* ``optimizer.safetensors``: every optimizer state tensor, keyed ``state.<param index>.<name>``;
* ``rng-rank<r>.safetensors``: the torch CPU (and CUDA) RNG state of process ``r``;
* ``trainer.json``: step, data position, scheduler, optimizer hyper-parameters, the config, running totals, and
  the SHA-256 of each tensor file (checked on load).

It is first written to a temporary sibling directory, every file and the directory are fsynced, and only then is
it renamed into place, so a run killed at any moment leaves either a complete checkpoint or none: resuming never
sees a torn one. No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from statelab.errors import CheckpointError
from statelab.fileio import fsync_dir, fsync_file, read_json_object

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "checkpoint_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "begin_checkpoint",
    "write_model",
    "write_optimizer",
    "write_rng",
    "finish_checkpoint",
    "read_checkpoint",
    "load_model_tensors",
    "load_optimizer",
    "restore_rng",
    "prune_checkpoints",
]

CHECKPOINT_FORMAT = 1
_PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk and its ``trainer.json`` contents."""

    path: Path
    step: int
    meta: dict[str, Any]


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"{_PREFIX}{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir``, oldest first (temporary directories are ignored)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        digits = p.name[len(_PREFIX) :]
        if p.is_dir() and p.name.startswith(_PREFIX) and digits.isdigit() and (p / "trainer.json").is_file():
            found.append((int(digits), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def begin_checkpoint(out_dir: str | Path, step: int) -> Path:
    """Create (afresh) the temporary directory that checkpoint ``step`` is written into."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_model(tmp: Path, model: nn.Module) -> None:
    """``model.safetensors``: parameters and buffers; tensors shared by several names are stored once."""
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))


def write_optimizer(tmp: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.safetensors`` with all state tensors; returns the JSON-able remainder of the state dict."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    safetensors.torch.save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}


def write_rng(tmp: Path, rank: int) -> None:
    """``rng-rank<rank>.safetensors``: the torch CPU RNG state and, when CUDA is up, every device's."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    path = tmp / f"rng-rank{rank}.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    fsync_file(path)


def finish_checkpoint(tmp: Path, meta: dict[str, Any]) -> Path:
    """Write ``trainer.json`` (with file hashes), fsync everything, then rename ``tmp`` into place."""
    files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
    for name in files:
        fsync_file(tmp / name)
    meta = {**meta, "format": CHECKPOINT_FORMAT, "files": {name: _sha256(tmp / name) for name in files}}
    with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``trainer.json`` of a checkpoint and verify the hash of every tensor file it lists."""
    p = Path(path)
    meta_path = p / "trainer.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{p} is not a training checkpoint: trainer.json is missing")
    meta = read_json_object(meta_path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: checkpoint format {meta.get('format')!r}, this statelab reads {CHECKPOINT_FORMAT}")
    for name, digest in meta.get("files", {}).items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{p}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{p}: {name} fails its SHA-256 check (corrupt or modified)")
    return Checkpoint(path=p, step=int(meta["step"]), meta=meta)


def load_model_tensors(ckpt: Checkpoint, model: nn.Module) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict: every name must match)."""
    missing, unexpected = safetensors.torch.load_model(model, str(ckpt.path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: model tensors do not match this model (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )


def load_optimizer(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state written by :func:`write_optimizer`."""
    tensors = safetensors.torch.load_file(str(ckpt.path / "optimizer.safetensors"))
    meta = ckpt.meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = val
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    if len(groups) != len(optimizer.param_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, optimizer.param_groups, strict=True)
    ):
        raise CheckpointError(f"{ckpt.path}: optimizer parameter groups do not match this model")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(ckpt: Checkpoint, rank: int) -> bool:
    """Restore process ``rank``'s RNG states; ``False`` when the checkpoint has none for this rank."""
    path = ckpt.path / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = safetensors.torch.load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


def prune_checkpoints(out_dir: str | Path, keep: int, protect: Sequence[Path] = ()) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale temporary directories)."""
    found = list_checkpoints(out_dir)
    for _, p in found[: max(0, len(found) - keep)]:
        if p not in protect:
            shutil.rmtree(p, ignore_errors=True)
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        for p in root.glob(f"{_PREFIX}*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
