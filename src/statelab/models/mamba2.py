"""Mamba-2 language model with explicit state: ``logits, state = model(input_ids, state=None)``.

Architecture (Dao & Gu, arXiv 2405.21060; transformers' ``Mamba2ForCausalLM``, mamba_ssm's ``MambaLMHeadModel``
with ``ssm_cfg.layer = "Mamba2"``): embedding, ``L`` blocks ``h = h + Mixer(RMSNorm(h))`` with the residual
stream in fp32 (``residual_in_fp32``), a final RMSNorm and an output head tied to the embedding or not.

State layout (:class:`statelab.State`, arch ``"mamba2"``): ssm ``[L, B, H, P, N]``, conv ``[L, B, C, K - 1]``
with ``C = D + 2·G·N``, ΣΔ ``[L, B, H]`` fp32.

Checkpoints: Hugging Face (``Mamba2ForCausalLM``: ``backbone.embeddings``, ``backbone.layers.i.{norm,mixer.*}``,
``backbone.norm_f``, ``lm_head``) and mamba_ssm (``backbone.embedding``, same layer names, padded vocabulary);
``save_pretrained`` writes the Hugging Face form.
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
from statelab.layers.mamba2 import Mamba2LayerState, Mamba2Mixer
from statelab.layers.norm import RMSNorm
from statelab.models.base import HFExport, RunOutput, StatefulLM, advanced_state, step_buffers
from statelab.ops.ssd import BACKENDS
from statelab.state.core import State

__all__ = ["Mamba2Config", "Mamba2LM"]


@dataclass(frozen=True)
class Mamba2Config:
    """Typed, frozen config of a Mamba-2 language model.

    Attributes:
        vocab_size: V, rows of the embedding (already padded, if the checkpoint pads).
        d_model: M. n_layer: L. d_state: N. head_dim: P. n_groups: G. d_conv: K.
        expand: D = expand · M, must equal H · P for an integer number of heads H.
        chunk_size: the checkpoint's scan chunk length (kept for round trips; it does not change results).
        time_step_limit: ``(lo, hi)`` clamp of Δ after softplus.
        use_bias: bias in the mixer's in/out projections. use_conv_bias: bias in the conv.
        norm_eps: epsilon of every RMSNorm. residual_in_fp32: keep the residual stream in fp32.
        tie_embeddings: the output head reuses the embedding matrix.
        bos_token_id, eos_token_id, pad_token_id: carried to and from Hugging Face configs.
    """

    vocab_size: int
    d_model: int
    n_layer: int
    d_state: int = 128
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 256
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    use_bias: bool = False
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        ints = ("vocab_size", "d_model", "n_layer", "d_state", "head_dim", "n_groups", "d_conv", "expand", "chunk_size")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Mamba2Config.{name} must be a positive int, got {v!r}")
        for name in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Mamba2Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"Mamba2Config.{name} must be an int or None, got {v!r}")
        if not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ConfigError(f"Mamba2Config.norm_eps must be a positive float, got {self.norm_eps!r}")
        lim = self.time_step_limit
        if not isinstance(lim, (tuple, list)) or len(lim) != 2 or not all(isinstance(v, (int, float)) for v in lim):
            raise ConfigError(f"Mamba2Config.time_step_limit must be (lo, hi), got {lim!r}")
        object.__setattr__(self, "time_step_limit", (float(lim[0]), float(lim[1])))
        if not 0.0 <= self.time_step_limit[0] < self.time_step_limit[1]:
            raise ConfigError(f"Mamba2Config.time_step_limit needs 0 <= lo < hi, got {self.time_step_limit}")
        if self.d_inner % self.head_dim:
            raise ConfigError(f"d_inner = expand·d_model = {self.d_inner} not a multiple of head_dim={self.head_dim}")
        if self.n_heads % self.n_groups:
            raise ConfigError(f"heads H = {self.n_heads} must be a multiple of n_groups = {self.n_groups}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mamba2Config:
        """Build from a dict; unknown keys and wrong types are a ``ConfigError`` naming the key."""
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        return d


class Mamba2Block(nn.Module):
    """``h -> h + Mixer(RMSNorm(h))`` (pre-norm residual block)."""

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = Mamba2Mixer(
            config.d_model,
            config.d_inner,
            config.d_state,
            config.n_groups,
            config.head_dim,
            d_conv=config.d_conv,
            use_bias=config.use_bias,
            use_conv_bias=config.use_conv_bias,
            time_step_limit=config.time_step_limit,
            norm_eps=config.norm_eps,
        )


def _hf_limit(v: Any) -> tuple[float, float]:
    """A time-step limit as written by transformers or mamba_ssm: ``[lo, hi]``, with ``inf`` possibly spelled
    ``{"__float__": "Infinity"}`` (transformers' JSON encoding of non-finite floats) or ``"inf"``."""
    if v is None:
        return (0.0, math.inf)

    def num(x: Any) -> float:
        if isinstance(x, dict) and set(x) == {"__float__"}:
            x = x["__float__"]
        if isinstance(x, bool) or not isinstance(x, (int, float, str)):
            raise CheckpointError(f"config: time_step_limit entries must be numbers, got {x!r}")
        return float(x)

    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise CheckpointError(f"config: time_step_limit must be [lo, hi], got {v!r}")
    return (num(v[0]), num(v[1]))


class Mamba2LM(HFExport, StatefulLM):
    """Mamba-2 language model. ``logits [B, T, V], state = model(input_ids [B, T], state=None)``.

    ``backend`` (``"naive" | "chunk" | "cuda"``) selects the SSD implementation of every layer; it never changes
    results beyond rounding. Parameters ``A_log``, ``D`` and ``dt_bias`` stay fp32 when the model is cast.
    """

    arch: ClassVar[str] = "mamba2"
    fp32_params: ClassVar[tuple[str, ...]] = ("A_log", "D", "dt_bias")

    def __init__(self, config: Mamba2Config, backend: str = "chunk") -> None:
        super().__init__()
        if not isinstance(config, Mamba2Config):
            raise ConfigError(f"Mamba2LM needs a Mamba2Config, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([Mamba2Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.backend = backend
        if self.embedding.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation for training from scratch (mamba_ssm's ``_init_weights``): embeddings and head
        ``N(0, 0.02)``, projection biases zero, ``out_proj`` scaled by ``1 / sqrt(L)`` (GPT-2's residual scaling).
        Mixer decay parameters keep their own initialisation (:meth:`Mamba2Mixer.reset_parameters`)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.layers:
            mixer = block.mixer
            for lin in (mixer.in_proj, mixer.out_proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            mixer.out_proj.weight.div_(math.sqrt(self.config.n_layer))

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; expected one of {BACKENDS}")
        self._backend = value
        for block in self.layers:
            block.mixer.backend = value

    def set_backend(self, backend: str) -> None:
        """SSD backend of every layer: ``"chunk"`` (default), ``"naive"`` or ``"cuda"`` (as ``model.backend = b``)."""
        self.backend = backend

    def config_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **self.config.to_dict()}

    def zero_state(
        self, batch_size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        """The state before any token, fp32 unless ``dtype`` says otherwise (ΣΔ is always fp32); the model itself
        continues only from fp32 states, whatever its own dtype (``check_state``)."""
        c = self.config
        dtype = dtype or torch.float32
        device = device if device is not None else self.device
        L = c.n_layer
        return State(
            arch=self.arch,
            ssm=torch.zeros(L, batch_size, c.n_heads, c.head_dim, c.d_state, dtype=dtype, device=device),
            conv=torch.zeros(L, batch_size, c.conv_dim, c.d_conv - 1, dtype=dtype, device=device),
            sum_delta=torch.zeros(L, batch_size, c.n_heads, dtype=torch.float32, device=device),
            n_tokens=0,
            fingerprint=self.fingerprint if device != "meta" and str(device) != "meta" else "",
        )

    def decay_A(self) -> torch.Tensor:
        """``A = -exp(A_log)`` of every layer, ``[L, H]`` fp32."""
        return torch.stack([-torch.exp(b.mixer.A_log.detach().float()) for b in self.layers])

    def _run(
        self,
        input_ids: torch.Tensor,
        state: State | None,
        positions: Sequence[int] | None,
        with_head: bool,
        lengths: torch.Tensor | None = None,
    ) -> RunOutput:
        """One pass over ``input_ids [B, T]`` from ``state``; states after ``positions`` (1-based) if given;
        ``lengths [B]``: real tokens per row (right padding), see :class:`statelab.models.base.StatefulLM`."""
        self.check_input(input_ids)
        Bsz, T = input_ids.shape
        if state is None:
            state = self.zero_state(Bsz, device=input_ids.device)
        else:
            self.check_state(state, Bsz)
        pos = None if positions is None else [int(p) for p in positions]
        if pos is not None and any(p < 1 or p > T for p in pos):
            raise ValueError(f"positions must lie in [1, {T}], got {pos}")
        c = self.config
        h = self.embedding(input_ids)
        final: list[Mamba2LayerState] = []
        at: list[list[Mamba2LayerState]] = []
        # without autograd every layer writes its new SSM state straight into one fresh [L, ...] tensor
        ssm_all = None if torch.is_grad_enabled() else torch.empty_like(state.ssm)
        for i, block in enumerate(self.layers):
            residual = h.float() if c.residual_in_fp32 else h
            x = block.norm(h.to(block.norm.weight.dtype))
            layer_state = Mamba2LayerState(state.conv[i], state.ssm[i], state.sum_delta[i])
            out_i = None if ssm_all is None else ssm_all[i]
            y, new = block.mixer(x, layer_state, positions=pos, lengths=lengths, ssm_out=out_i)
            h = residual + y
            final.append(new)
            if new.at is not None:
                a = new.at  # [B, P, ...] parts: one layer state per position
                at.append([Mamba2LayerState(a.conv[:, j], a.ssm[:, j], a.sum_delta[:, j]) for j in range(len(pos))])
        logits = None
        if with_head:
            hn = self.norm_f(h)
            w = self.embedding.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hn.to(w.dtype), w).float()
        n_new = (T,) * Bsz if lengths is None else tuple(lengths.tolist())
        new_state, states_at_out = self._assemble_states(final, at, pos, state.tokens, n_new, state.dtype, ssm_all)
        return RunOutput(logits=logits, state=new_state, states_at=states_at_out)

    @torch.no_grad()
    def _step(
        self, tokens: torch.Tensor, state: State, active: torch.Tensor | None, out: State | None
    ) -> tuple[torch.Tensor, State]:
        """The decode step (contract in :meth:`StatefulLM._step`): one tight loop over layers, each writing its new
        state straight into ``out``'s slice for it (:meth:`Mamba2Mixer.step`)."""
        if self.backend == "naive":  # the reference backend stays the reference, one token included
            return super()._step(tokens, state, active, out)
        plan, out = step_buffers(self, state, out)
        c = self.config
        h = self.embedding(tokens)
        for i, block in enumerate(self.layers):
            residual = h.float() if c.residual_in_fp32 else h
            old = Mamba2LayerState(state.conv[i], state.ssm[i], state.sum_delta[i])
            new = Mamba2LayerState(out.conv[i], out.ssm[i], out.sum_delta[i])
            y = block.mixer.step(block.norm(h.to(block.norm.weight.dtype)), old, new, plan.layers[i], active)
            h = residual + y
        logits = plan.head(self.norm_f(h)).float()
        return logits, advanced_state(state, out, active)

    @classmethod
    def config_from_hf(cls, cfg: dict[str, Any]) -> Mamba2Config:
        """``Mamba2Config`` from a Hugging Face ``config.json`` dict (keys that do not change the math ignored)."""
        try:
            hidden = int(cfg["hidden_size"])
            expand = int(cfg.get("expand", 2))
            head_dim = int(cfg.get("head_dim", 64))
            if "num_heads" in cfg and int(cfg["num_heads"]) * head_dim != expand * hidden:
                raise CheckpointError(
                    f"config: num_heads·head_dim = {int(cfg['num_heads']) * head_dim} must equal "
                    f"expand·hidden_size = {expand * hidden}"
                )
            act = cfg.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise CheckpointError(f"config: hidden_act {act!r} is not supported (Mamba-2 uses silu)")
            if cfg.get("norm_before_gate", False):
                raise CheckpointError("config: norm_before_gate=True is not supported (Mamba-2 gates before the norm)")
            return Mamba2Config(
                vocab_size=int(cfg["vocab_size"]),
                d_model=hidden,
                n_layer=int(cfg["num_hidden_layers"]),
                d_state=int(cfg.get("state_size", 128)),
                head_dim=head_dim,
                n_groups=int(cfg.get("n_groups", 1)),
                d_conv=int(cfg.get("conv_kernel", 4)),
                expand=expand,
                chunk_size=int(cfg.get("chunk_size", 256)),
                time_step_limit=_hf_limit(cfg.get("time_step_limit")),
                use_bias=bool(cfg.get("use_bias", False)),
                use_conv_bias=bool(cfg.get("use_conv_bias", True)),
                norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=_opt_int(cfg.get("bos_token_id")),
                eos_token_id=_opt_int(cfg.get("eos_token_id")),
                pad_token_id=_opt_int(cfg.get("pad_token_id")),
            )
        except KeyError as e:
            raise CheckpointError(f"Mamba-2 config.json lacks the key {e}") from e
        except ConfigError as e:
            raise CheckpointError(f"invalid Mamba-2 config: {e}") from e

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this model."""
        c = self.config
        return {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layer,
            "state_size": c.d_state,
            "head_dim": c.head_dim,
            "num_heads": c.n_heads,
            "n_groups": c.n_groups,
            "conv_kernel": c.d_conv,
            "expand": c.expand,
            "chunk_size": c.chunk_size,
            "time_step_limit": [c.time_step_limit[0], _json_float(c.time_step_limit[1])],
            "use_bias": c.use_bias,
            "use_conv_bias": c.use_conv_bias,
            "layer_norm_epsilon": c.norm_eps,
            "residual_in_fp32": c.residual_in_fp32,
            "tie_word_embeddings": c.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }

    @classmethod
    def _from_backbone(
        cls, config: Mamba2Config, sd: dict[str, torch.Tensor], embed_key: str, fmt: str
    ) -> dict[str, torch.Tensor]:
        """Rename ``backbone.*`` / ``lm_head`` tensors to statelab names (shared by both checkpoint formats)."""
        out: dict[str, torch.Tensor] = {}
        rest = dict(sd)
        renames = ((f"backbone.{embed_key}.weight", "embedding.weight"), ("backbone.norm_f.weight", "norm_f.weight"))
        for src, dst in renames:
            if src in rest:
                out[dst] = rest.pop(src)
        head = rest.pop("lm_head.weight", None)
        if not config.tie_embeddings:
            if head is None:
                raise CheckpointError(f"{fmt} checkpoint: untied model but lm_head.weight is missing")
            out["lm_head.weight"] = head
        mixer_names = {
            "in_proj.weight": "in_proj.weight",
            "in_proj.bias": "in_proj.bias",
            "out_proj.weight": "out_proj.weight",
            "out_proj.bias": "out_proj.bias",
            "conv1d.bias": "conv_bias",
            "dt_bias": "dt_bias",
            "A_log": "A_log",
            "D": "D",
            "norm.weight": "norm.weight",
        }
        for key in list(rest):
            parts = key.split(".")
            if len(parts) < 4 or parts[0] != "backbone" or parts[1] != "layers":
                continue
            i, tail = parts[2], ".".join(parts[3:])
            t = rest.pop(key)
            if tail == "norm.weight":
                out[f"layers.{i}.norm.weight"] = t
            elif tail == "mixer.conv1d.weight":
                out[f"layers.{i}.mixer.conv_weight"] = t.reshape(t.shape[0], -1) if t.dim() == 3 else t
            elif tail.startswith("mixer.") and tail[6:] in mixer_names:
                out[f"layers.{i}.mixer.{mixer_names[tail[6:]]}"] = t
            else:
                out[key] = t  # unknown: reported as unexpected by the loader
        out.update(rest)
        return out

    @classmethod
    def state_dict_from_hf(cls, config: Mamba2Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hugging Face tensor names -> statelab module names."""
        return cls._from_backbone(config, sd, "embeddings", "Hugging Face")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's tensors under Hugging Face names (conv weight as ``[C, 1, K]``)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in self.state_dict().items():
            if name == "embedding.weight":
                out["backbone.embeddings.weight"] = t
            elif name == "norm_f.weight":
                out["backbone.norm_f.weight"] = t
            elif name == "lm_head.weight":
                out[name] = t
            else:
                _, i, rest = name.split(".", 2)
                if rest == "mixer.conv_weight":
                    out[f"backbone.layers.{i}.mixer.conv1d.weight"] = t[:, None, :]
                elif rest == "mixer.conv_bias":
                    out[f"backbone.layers.{i}.mixer.conv1d.bias"] = t
                else:
                    out[f"backbone.layers.{i}.{rest}"] = t
        return out

    @classmethod
    def config_from_mamba_ssm(cls, cfg: dict[str, Any]) -> Mamba2Config:
        """``Mamba2Config`` from a mamba_ssm ``config.json`` (``MambaConfig`` with ``ssm_cfg.layer = "Mamba2"``)."""
        ssm = dict(cfg.get("ssm_cfg") or {})
        if int(cfg.get("d_intermediate", 0) or 0) != 0:
            raise CheckpointError("mamba_ssm config: d_intermediate > 0 (MLP blocks) is not supported")
        if cfg.get("attn_layer_idx"):
            raise CheckpointError("mamba_ssm config: attention layers (attn_layer_idx) are not supported")
        if not cfg.get("rms_norm", True):
            raise CheckpointError("mamba_ssm config: rms_norm=False (LayerNorm blocks) is not supported")
        if ssm.get("norm_before_gate", False) or not ssm.get("rmsnorm", True) or ssm.get("D_has_hdim", False):
            raise CheckpointError(
                "mamba_ssm config: only Mamba-2 with rmsnorm=True, norm_before_gate=False and D_has_hdim=False "
                "is supported"
            )
        if (
            "d_ssm" in ssm
            and ssm["d_ssm"] is not None
            and int(ssm["d_ssm"]) != int(ssm.get("expand", 2)) * int(cfg["d_model"])
        ):
            raise CheckpointError("mamba_ssm config: d_ssm != d_inner (gated MLP inside the mixer) is not supported")
        try:
            vocab = int(cfg["vocab_size"])
            mult = int(cfg.get("pad_vocab_size_multiple", 8))
            if vocab % mult:
                vocab += mult - vocab % mult
            return Mamba2Config(
                vocab_size=vocab,
                d_model=int(cfg["d_model"]),
                n_layer=int(cfg["n_layer"]),
                d_state=int(ssm.get("d_state", 128)),
                head_dim=int(ssm.get("headdim", 64)),
                n_groups=int(ssm.get("ngroups", 1)),
                d_conv=int(ssm.get("d_conv", 4)),
                expand=int(ssm.get("expand", 2)),
                chunk_size=int(ssm.get("chunk_size", 256)),
                time_step_limit=_hf_limit(ssm.get("dt_limit")),
                use_bias=bool(ssm.get("bias", False)),
                use_conv_bias=bool(ssm.get("conv_bias", True)),
                norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
                residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
                tie_embeddings=bool(cfg.get("tie_embeddings", True)),
            )
        except KeyError as e:
            raise CheckpointError(f"mamba_ssm config.json lacks the key {e}") from e
        except ConfigError as e:
            raise CheckpointError(f"invalid mamba_ssm Mamba-2 config: {e}") from e

    @classmethod
    def state_dict_from_mamba_ssm(cls, config: Mamba2Config, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """mamba_ssm tensor names -> statelab module names (a tied ``lm_head.weight`` copy is dropped)."""
        return cls._from_backbone(config, sd, "embedding", "mamba_ssm")


def _json_float(v: float) -> float | dict[str, str]:
    """``v`` as strict JSON allows: an infinite limit in transformers' ``{"__float__": "Infinity"}`` spelling."""
    return {"__float__": "Infinity"} if v == math.inf else v


def _opt_int(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, list):  # transformers allows a list of eos ids; statelab keeps the first
        return int(v[0]) if v else None
    return int(v)
