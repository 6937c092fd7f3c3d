"""``load_model(path_or_id)``: read a checkpoint into a statelab model, whatever its on-disk format.

Formats read:

* **Hugging Face** (``MambaForCausalLM``, ``Mamba2ForCausalLM``): ``config.json`` plus ``model.safetensors``, or a
  sharded ``model.safetensors.index.json`` with its shards (``pytorch_model.bin`` as a last resort).
* **mamba_ssm** (``state-spaces/mamba``): ``config.json`` with ``d_model``, ``n_layer``, ``ssm_cfg``... plus
  ``pytorch_model.bin``, read with ``torch.load(weights_only=True)`` (tensors only, never code).
* ``"embedded"``: the small model shipped inside the package (``statelab/embedded/``, Hugging Face format).
* a hub id (``"state-spaces/mamba-130m-hf"``): fetched with ``huggingface_hub.snapshot_download`` when a hub is
  reachable; otherwise a ``CheckpointError`` that says so.

Registering an architecture
---------------------------
``ARCHITECTURES`` maps a statelab arch name to an ``ArchSpec``: the module and class of the model (imported
lazily, so an architecture whose module is absent only fails when a checkpoint asks for it), the Hugging Face
``architectures`` / ``model_type`` names and the mamba_ssm ``ssm_cfg["layer"]`` names that select it. To add one,
call ``register_architecture(ArchSpec(...))`` (or add an entry below). The model class must provide:

* ``config_from_hf(cfg: dict) -> Config`` and ``state_dict_from_hf(config, sd) -> dict[str, Tensor]``
  (classmethods; ``sd`` holds the checkpoint's tensors under the Hugging Face names, the result uses the
  statelab module names);
* ``config_from_mamba_ssm(cfg: dict) -> Config`` and ``state_dict_from_mamba_ssm(config, sd) -> dict``;
* ``__init__(config)`` building the module (it is built on the meta device, then the weights are assigned);
* ``fp32_params``: a tuple of parameter-name suffixes that stay fp32 when the model is cast (decay parameters);
* ``save_pretrained(directory)`` writing Hugging Face format (``write_hf_checkpoint`` does the file part).

``load_model`` then checks the converted tensors against the module: a missing weight, an extra weight or a
shape mismatch is a ``CheckpointError`` naming the tensors.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from statelab.errors import CheckpointError
from statelab.fileio import read_json_object

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "register_architecture",
    "model_class",
    "load_model",
    "load_state_dict_into",
    "read_weights",
    "write_hf_checkpoint",
    "embedded_dir",
]


@dataclass(frozen=True)
class ArchSpec:
    """How to find and build one architecture.

    Attributes:
        arch: statelab name (``State.arch``), e.g. ``"mamba1"``.
        module: module defining the model class, imported on first use.
        class_name: the ``StatefulLM`` subclass in that module.
        hf_architectures: Hugging Face ``config.json["architectures"]`` entries that select it.
        hf_model_types: Hugging Face ``config.json["model_type"]`` values that select it.
        mamba_ssm_layers: mamba_ssm ``ssm_cfg["layer"]`` values that select it.
    """

    arch: str
    module: str
    class_name: str
    hf_architectures: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    mamba_ssm_layers: tuple[str, ...] = ()


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace) an architecture in the registry."""
    ARCHITECTURES[spec.arch] = spec


register_architecture(
    ArchSpec("mamba1", "statelab.models.mamba1", "Mamba1LM", ("MambaForCausalLM",), ("mamba",), ("Mamba1",))
)
register_architecture(
    ArchSpec("mamba2", "statelab.models.mamba2", "Mamba2LM", ("Mamba2ForCausalLM",), ("mamba2",), ("Mamba2",))
)


def model_class(arch: str) -> type:
    """The model class registered for ``arch`` (imported now)."""
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise CheckpointError(f"unknown architecture {arch!r}; registered: {sorted(ARCHITECTURES)}")
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"architecture {arch!r} is registered but {spec.module} cannot be imported: {e}") from e
    cls = getattr(module, spec.class_name, None)
    if cls is None:
        raise CheckpointError(f"architecture {arch!r}: {spec.module} defines no {spec.class_name}")
    return cls


def embedded_dir() -> Path:
    """The directory of the model shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "embedded"


def _resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory for ``path_or_id``: itself, the embedded model, or a hub snapshot."""
    if str(path_or_id) == "embedded":
        d = embedded_dir()
        if not (d / "config.json").is_file():
            raise CheckpointError(
                f"no embedded model is installed: {d} has no config.json (the package ships one once it is trained)"
            )
        return d
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; load_model expects a checkpoint directory")
        return p
    s = str(path_or_id)
    parts = s.split("/")
    if len(parts) != 2 or not all(parts) or s.startswith((".", "~")):
        raise CheckpointError(f"{s!r} is neither an existing directory, 'embedded', nor a hub id 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(f"{s!r} is not a local directory and huggingface_hub is not installed") from e
    try:
        local = snapshot_download(
            s, allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]
        )
    except Exception as e:  # any hub failure (offline, unknown repo, no network) becomes one clear error
        raise CheckpointError(
            f"{s!r} is not a local directory and could not be fetched from the hub ({type(e).__name__}: {e})"
        ) from e
    return Path(local)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, by name (safetensors, sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs 'weight_map')") from e
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            f = directory / shard
            if not f.is_file():
                raise CheckpointError(f"shard {shard} listed in {index.name} is missing from {directory}")
            out.update(load_file(str(f)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"tensors listed in {index.name} but absent from the shards: {missing[:5]}")
        return out
    binf = directory / "pytorch_model.bin"
    if binf.is_file():
        # weights_only: the unpickler accepts tensors and plain containers, never code objects
        sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{binf} does not hold a flat dict of tensors")
        return dict(sd)
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _detect(cfg: dict[str, Any], directory: Path) -> tuple[str, str]:
    """``(arch, format)`` of a checkpoint from its config, format ``"hf"`` or ``"mamba_ssm"``."""
    if "d_model" in cfg and "n_layer" in cfg:
        layer = (cfg.get("ssm_cfg") or {}).get("layer", "Mamba1")
        for spec in ARCHITECTURES.values():
            if layer in spec.mamba_ssm_layers:
                return spec.arch, "mamba_ssm"
        raise CheckpointError(f"{directory}: unknown mamba_ssm layer type {layer!r} in ssm_cfg")
    names = list(cfg.get("architectures") or [])
    mtype = cfg.get("model_type")
    for spec in ARCHITECTURES.values():
        if any(n in spec.hf_architectures for n in names) or (mtype is not None and mtype in spec.hf_model_types):
            return spec.arch, "hf"
    known = sorted(a for s in ARCHITECTURES.values() for a in s.hf_architectures)
    raise CheckpointError(
        f"{directory}: unknown architecture (architectures={names}, model_type={mtype!r}); statelab reads {known} "
        "and mamba_ssm checkpoints"
    )


def load_state_dict_into(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Assign ``sd`` to ``model``'s parameters after checking names and shapes (``CheckpointError`` otherwise)."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    problems = []
    if missing:
        problems.append(f"missing weights {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected weights {extra[:6]}{' ...' if len(extra) > 6 else ''}")
    bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(sd))
        if tuple(sd[k].shape) != tuple(want[k].shape)
    ]
    if bad:
        problems.append(f"shape mismatch {bad[:4]}{' ...' if len(bad) > 4 else ''}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)


def _cast(model: torch.nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> None:
    """Cast floating parameters to ``dtype``, except those named by ``keep_fp32`` (suffixes), which stay fp32."""
    for name, p in model.named_parameters():
        target = torch.float32 if name.endswith(keep_fp32) else dtype
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def load_model(
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """Load a checkpoint as a statelab model (``Mamba1LM``, ``Mamba2LM``, ...), in eval mode.

    Args:
        path_or_id: a checkpoint directory (Hugging Face or mamba_ssm format), ``"embedded"``, or a hub id.
        dtype: compute dtype of the weights; ``None`` means fp32 (the fast and exact choice on CPU). Decay
            parameters (``A_log``, ``D``, Δ bias) stay fp32 whatever ``dtype`` is.
        device: where to put the model (default CPU).

    Raises:
        CheckpointError: unknown architecture, unreadable files, missing/extra weights, shape mismatch.
    """
    directory = _resolve(path_or_id)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{directory} has no config.json")
    cfg = read_json_object(cfg_file)
    arch, fmt = _detect(cfg, directory)
    cls = model_class(arch)
    if fmt == "hf":
        config = cls.config_from_hf(cfg)
        sd = cls.state_dict_from_hf(config, read_weights(directory))
    else:
        config = cls.config_from_mamba_ssm(cfg)
        sd = cls.state_dict_from_mamba_ssm(config, read_weights(directory))
    with torch.device("meta"):
        model = cls(config)
    load_state_dict_into(model, sd)
    _cast(model, dtype or torch.float32, tuple(getattr(cls, "fp32_params", ())))
    if device is not None:
        model.to(device)
    model._source_dir = directory  # lets check_state recognise a state of this checkpoint made in another dtype
    return model.eval()


def write_hf_checkpoint(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (contiguous, unshared copies) into ``directory``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
