"""Mamba-1 language model with explicit state (arXiv 2312.00752; the ``MambaLMHeadModel`` of mamba_ssm).

``logits, state = Mamba1LM(config)(input_ids [B, T], state=None)``. Architecture: token embedding, ``n_layer``
pre-norm residual blocks ``h ← h + mixer(rmsnorm(h))`` with the residual stream kept in fp32, a final RMSNorm and
an output head tied to the embedding (or untied). The vocabulary is padded up to ``pad_vocab_size_multiple``
as mamba_ssm does, so logits have ``config.padded_vocab_size`` columns.

State layout (``statelab.state.core``): ``ssm [L, B, D, N]``, ``conv [L, B, D, K - 1]``, ``sum_delta [L, B, D]``.
Checkpoints: ``config_from_hf`` / ``state_dict_from_hf`` (``MambaForCausalLM``), ``config_from_mamba_ssm`` /
``state_dict_from_mamba_ssm``, and ``save_pretrained`` (Hugging Face format), used by ``statelab.load_model``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from statelab.config import from_dict
from statelab.errors import CheckpointError, ConfigError
from statelab.layers.mamba1 import Mamba1Mixer, MixerState
from statelab.layers.norm import RMSNorm
from statelab.layers.protocol import check_backend
from statelab.models.base import HFExport, RunOutput, StatefulLM, advanced_state, step_buffers
from statelab.state.core import State

__all__ = ["Mamba1Config", "Mamba1LM"]


@dataclass(frozen=True)
class Mamba1Config:
    """Mamba-1 model config (mamba_ssm names; ``hf`` names in brackets).

    Attributes:
        d_model: M [hidden_size]. n_layer: L [num_hidden_layers]. vocab_size: tokens [vocab_size].
        d_state: N [state_size]. d_conv: K [conv_kernel]. expand: D = expand · M [expand].
        dt_rank: R, or ``"auto"`` = ceil(M / 16) [time_step_rank].
        conv_bias: conv has a bias [use_conv_bias]. bias: in/out projections have biases [use_bias].
        rms_norm_eps: epsilon of every RMSNorm [layer_norm_epsilon].
        residual_in_fp32: keep the residual stream in fp32 [residual_in_fp32].
        tie_embeddings: output head shares the embedding matrix [tie_word_embeddings].
        pad_vocab_size_multiple: pad the vocabulary up to a multiple of this (1 = no padding).
        dt_min, dt_max, dt_init_floor, dt_scale, dt_init: Δ initialisation [time_step_*].
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False
    rms_norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    dt_init: str = "random"

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Mamba1Config.{name} must be a positive int, got {v!r}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ConfigError(f"Mamba1Config.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        if self.dt_init not in ("random", "constant"):
            raise ConfigError(f"Mamba1Config.dt_init must be 'random' or 'constant', got {self.dt_init!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mamba1Config:
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m


class Mamba1Block(nn.Module):
    """Pre-norm residual block: ``h ← h + mixer(rmsnorm(h))``."""

    def __init__(self, config: Mamba1Config, backend: str = "chunk") -> None:
        super().__init__()
        c = config
        self.norm = RMSNorm(c.d_model, eps=c.rms_norm_eps)
        self.mixer = Mamba1Mixer(
            c.d_model,
            c.d_inner,
            c.d_state,
            c.d_conv,
            c.dt_rank_value,
            c.conv_bias,
            c.bias,
            c.dt_min,
            c.dt_max,
            c.dt_init_floor,
            c.dt_scale,
            c.dt_init,
            backend=backend,
        )


class Mamba1LM(HFExport, StatefulLM):
    """Mamba-1 language model: ``logits [B, T, V], state = model(input_ids [B, T], state=None)``.

    ``backend`` (``"chunk" | "naive"``, validated) selects the selective-scan implementation of every layer.
    """

    arch: ClassVar[str] = "mamba1"
    # decay parameters stay fp32 when the model is cast (STYLE: numerics of recurrences)
    fp32_params: ClassVar[tuple[str, ...]] = ("A_log", ".D", "dt_proj.bias")

    def __init__(self, config: Mamba1Config, backend: str = "chunk") -> None:
        super().__init__()
        if not isinstance(config, Mamba1Config):
            raise ConfigError(f"Mamba1LM needs a Mamba1Config, got {type(config).__name__}")
        check_backend("Mamba1LM", backend, Mamba1Mixer.BACKENDS)
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Mamba1Block(config, backend) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.padded_vocab_size, False)
        if self.embedding.weight.device.type != "meta":
            nn.init.normal_(self.embedding.weight, std=0.02)

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def backend(self) -> str:
        """The selective-scan backend of the layers (``"chunk"`` or ``"naive"``)."""
        return self.layers[0].mixer.backend if len(self.layers) else "chunk"

    @backend.setter
    def backend(self, value: str) -> None:
        check_backend("Mamba1LM", value, Mamba1Mixer.BACKENDS)
        for block in self.layers:
            block.mixer.backend = value

    def set_backend(self, backend: str) -> None:
        """Selective-scan backend of every layer: ``"chunk"`` (default) or ``"naive"`` (as ``model.backend = b``)."""
        self.backend = backend

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        c = self.config
        dtype = dtype or self.dtype
        device = self.device if device is None else device
        L, D = c.n_layer, c.d_inner
        return State(
            arch=self.arch,
            ssm=torch.zeros(L, batch_size, D, c.d_state, dtype=dtype, device=device),
            conv=torch.zeros(L, batch_size, D, c.d_conv - 1, dtype=dtype, device=device),
            sum_delta=torch.zeros(L, batch_size, D, dtype=torch.float32, device=device),
            n_tokens=0,
            fingerprint=self.fingerprint if str(device) != "meta" else "",
        )

    def decay_A(self) -> torch.Tensor:
        """``A = -exp(A_log)`` of every layer, ``[L, D, N]`` fp32."""
        return torch.stack([block.mixer.A() for block in self.layers])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states ``[B, T, M]`` -> logits ``[B, T, V]``."""
        w = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h.to(w.dtype), w)

    def _run(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: Sequence[int] | None,
        with_head: bool,
        lengths: torch.Tensor | None = None,
    ) -> RunOutput:
        self.check_input(input_ids)
        Bsz, T = input_ids.shape
        if state is not None:
            self.check_state(state, Bsz)  # also refuses a state whose dtype is not the model's
        sdtype = self.dtype if state is None else state.dtype
        pos = None if positions is None else [int(p) for p in positions]
        h = self.embedding(input_ids.long())
        if self.config.residual_in_fp32:
            h = h.float()
        final: list[MixerState] = []
        at: list[list[MixerState]] = []
        for i, block in enumerate(self.layers):
            ls = None
            if state is not None:
                ls = MixerState(conv=state.conv[i], ssm=state.ssm[i], sum_delta=state.sum_delta[i])
            y, st = block.mixer(block.norm(h.to(block.norm.weight.dtype)), ls, positions=pos, lengths=lengths)
            h = h + y.to(h.dtype)
            final.append(st)
            if st.at is not None:
                a = st.at  # [B, P, ...] parts: one MixerState per position
                at.append([MixerState(a.conv[:, j], a.ssm[:, j], a.sum_delta[:, j]) for j in range(a.ssm.shape[1])])
        n0 = (0,) * Bsz if state is None else state.tokens
        n_new = (T,) * Bsz if lengths is None else tuple(lengths.tolist())
        new_state, states_at = self._assemble_states(final, at, pos, n0, n_new, sdtype)
        logits = self.head(self.norm_f(h)) if with_head else None
        return RunOutput(logits=logits, state=new_state, states_at=states_at)

    @torch.no_grad()
    def _step(
        self, tokens: torch.Tensor, state: State, active: torch.Tensor | None, out: State | None
    ) -> tuple[torch.Tensor, State]:
        """The decode step (contract in :meth:`StatefulLM._step`): one tight loop over layers, each writing its new
        state straight into ``out``'s slice for it (:meth:`Mamba1Mixer.step`)."""
        if any(b.mixer.backend == "naive" for b in self.layers):  # the reference backend stays the reference
            return super()._step(tokens, state, active, out)
        plan, out = step_buffers(self, state, out)
        h = self.embedding(tokens.long())
        if self.config.residual_in_fp32:
            h = h.float()
        for i, block in enumerate(self.layers):
            old = MixerState(state.conv[i], state.ssm[i], state.sum_delta[i])
            new = MixerState(out.conv[i], out.ssm[i], out.sum_delta[i])
            y = block.mixer.step(block.norm(h.to(block.norm.weight.dtype)), old, new, plan.layers[i], active)
            h = h + y.to(h.dtype)
        logits = plan.head(self.norm_f(h))
        return logits, advanced_state(state, out, active)

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any]) -> Mamba1Config:
        """``Mamba1Config`` from a transformers ``MambaConfig`` dict (``config.json``)."""
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"Mamba-1 checkpoints with hidden_act={cfg['hidden_act']!r} are not supported")
        try:
            d_model = cfg["hidden_size"]
            expand = cfg.get("expand", 2)
            inter = cfg.get("intermediate_size", expand * d_model)
            if inter != expand * d_model:
                raise CheckpointError(f"intermediate_size {inter} != expand {expand} x hidden_size {d_model}")
            return Mamba1Config(
                d_model=d_model,
                n_layer=cfg["num_hidden_layers"],
                vocab_size=cfg["vocab_size"],
                d_state=cfg.get("state_size", 16),
                d_conv=cfg.get("conv_kernel", 4),
                expand=expand,
                dt_rank=cfg.get("time_step_rank", "auto"),
                conv_bias=cfg.get("use_conv_bias", True),
                bias=cfg.get("use_bias", False),
                rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                tie_embeddings=cfg.get("tie_word_embeddings", True),
                dt_min=float(cfg.get("time_step_min", 0.001)),
                dt_max=float(cfg.get("time_step_max", 0.1)),
                dt_init_floor=float(cfg.get("time_step_floor", 1e-4)),
                dt_scale=float(cfg.get("time_step_scale", 1.0)),
                dt_init=cfg.get("time_step_init_scheme", "random"),
            )
        except KeyError as e:
            raise CheckpointError(f"Mamba config.json lacks required key {e}") from e
        except ConfigError as e:
            raise CheckpointError(f"Mamba config.json is invalid: {e}") from e

    @classmethod
    def state_dict_from_hf(cls, config: Mamba1Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename ``MambaForCausalLM`` tensors to statelab names (``conv1d.weight [D, 1, K]`` -> ``[D, K]``)."""
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k == "lm_head.weight":
                if not config.tie_embeddings:
                    out["lm_head.weight"] = v
                continue  # a tied head duplicates the embedding
            if not k.startswith("backbone."):
                out[k] = v  # reported as unexpected by the loader
                continue
            name = k[len("backbone.") :]
            if name in ("embeddings.weight", "embedding.weight"):
                out["embedding.weight"] = v
                continue
            out[_from_ref_name(name, v)] = _from_ref_tensor(name, v)
        return out

    @classmethod
    def config_from_mamba_ssm(cls, cfg: dict[str, Any]) -> Mamba1Config:
        """``Mamba1Config`` from a mamba_ssm ``MambaConfig`` dict (``d_model``, ``n_layer``, ``ssm_cfg``...)."""
        if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx"):
            raise CheckpointError("mamba_ssm checkpoints with MLP or attention layers are not supported")
        if not cfg.get("rms_norm", True):
            raise CheckpointError("mamba_ssm checkpoints with LayerNorm (rms_norm=false) are not supported")
        ssm = dict(cfg.get("ssm_cfg") or {})
        ssm.pop("layer", None)
        allowed = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                   "dt_init_floor", "conv_bias", "bias", "use_fast_path"}  # fmt: skip
        unknown = sorted(set(ssm) - allowed)
        if unknown:
            raise CheckpointError(f"mamba_ssm ssm_cfg has options statelab does not implement: {unknown}")
        ssm.pop("use_fast_path", None)
        try:
            return Mamba1Config.from_dict(
                {
                    "d_model": cfg["d_model"],
                    "n_layer": cfg["n_layer"],
                    "vocab_size": cfg["vocab_size"],
                    "residual_in_fp32": cfg.get("residual_in_fp32", True),
                    "tie_embeddings": cfg.get("tie_embeddings", True),
                    "pad_vocab_size_multiple": cfg.get("pad_vocab_size_multiple", 8),
                    **ssm,
                }
            )
        except KeyError as e:
            raise CheckpointError(f"mamba_ssm config.json lacks required key {e}") from e
        except ConfigError as e:
            raise CheckpointError(f"mamba_ssm config.json is invalid: {e}") from e

    @classmethod
    def state_dict_from_mamba_ssm(cls, config: Mamba1Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename mamba_ssm ``MambaLMHeadModel`` tensors (same names as Hugging Face but ``embedding``)."""
        return cls.state_dict_from_hf(config, sd)

    def hf_config(self) -> dict[str, Any]:
        """The transformers ``MambaConfig`` dict of this model."""
        c = self.config
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layer,
            "vocab_size": c.padded_vocab_size,
            "state_size": c.d_state,
            "conv_kernel": c.d_conv,
            "expand": c.expand,
            "intermediate_size": c.d_inner,
            "time_step_rank": c.dt_rank_value,
            "use_conv_bias": c.conv_bias,
            "use_bias": c.bias,
            "layer_norm_epsilon": c.rms_norm_eps,
            "residual_in_fp32": c.residual_in_fp32,
            "tie_word_embeddings": c.tie_embeddings,
            "time_step_min": c.dt_min,
            "time_step_max": c.dt_max,
            "time_step_floor": c.dt_init_floor,
            "time_step_scale": c.dt_scale,
            "time_step_init_scheme": c.dt_init,
            "hidden_act": "silu",
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors under ``MambaForCausalLM`` names."""
        out: dict[str, torch.Tensor] = {}
        for k, v in self.state_dict().items():
            if k == "embedding.weight":
                out["backbone.embeddings.weight"] = v
            elif k == "lm_head.weight":
                out[k] = v
            else:
                name, t = _to_ref(k, v)
                out["backbone." + name] = t
        return out


def _from_ref_name(name: str, v: torch.Tensor) -> str:
    if name.endswith("mixer.conv1d.weight"):
        return name.replace("mixer.conv1d.weight", "mixer.conv_weight")
    if name.endswith("mixer.conv1d.bias"):
        return name.replace("mixer.conv1d.bias", "mixer.conv_bias")
    return name


def _from_ref_tensor(name: str, v: torch.Tensor) -> torch.Tensor:
    if name.endswith("mixer.conv1d.weight") and v.dim() == 3 and v.shape[1] == 1:
        return v[:, 0, :]
    return v


def _to_ref(name: str, v: torch.Tensor) -> tuple[str, torch.Tensor]:
    if name.endswith("mixer.conv_weight"):
        return name.replace("mixer.conv_weight", "mixer.conv1d.weight"), v[:, None, :]
    if name.endswith("mixer.conv_bias"):
        return name.replace("mixer.conv_bias", "mixer.conv1d.bias"), v
    return name, v
