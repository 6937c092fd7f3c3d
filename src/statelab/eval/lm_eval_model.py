"""statelab models in lm-evaluation-harness: ``--model statelab``.

``StatelabLM`` is an ``lm_eval.api.model.LM`` registered as ``statelab``. It answers lm-eval's three request
types with :mod:`statelab.eval.scoring` (ragged batches; each distinct context read once, every continuation run
from its state), optionally starting every request from a stored skill or a soup.

Running it. lm-eval 0.4.13 finds models only in its own registry: it reads no entry points and has no plugin
option, so a model defined outside its source tree must be registered (imported) in the process before lm-eval
resolves ``--model``. statelab therefore starts lm-eval's own command line after importing this module::

    statelab lm-eval --model statelab --model_args pretrained=embedded --tasks hellaswag --batch_size auto
    python -m statelab.cli.lm_eval ...               # the same, without the statelab command

Every argument after ``lm-eval`` goes to lm-eval's parser unchanged. From Python, import this module and call
``lm_eval.simple_evaluate(model="statelab", model_args=...)``, or pass a ``StatelabLM`` instance.

``--model_args`` (comma-separated ``key=value``):

* ``pretrained``: checkpoint directory or ``embedded`` (default).
* ``tokenizer``: tokenizer file or directory (default: the checkpoint's).
* ``skill=NAME``, ``soup=A+B``, ``mix=mean``, ``weights=0.5+0.5`` with ``store=PATH``: the start state of every
  request (:func:`statelab.eval.skills.start_state`).
* ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16``. A skill stored from the same checkpoint in
  another dtype (usually fp32) is adopted (``model.adopt_state``: cast to this model's state dtype); a skill of
  another model is refused.
* ``batch_tokens``: padded positions per pass (default 4096); lm-eval's ``--batch_size N`` caps the rows per pass
  (``auto``: no cap, the token budget decides). lm-eval's default ``--batch_size`` is 1: pass ``auto`` for speed.
* ``max_gen_toks``: new-token limit of a generation request that names none (default 256).
* ``device``: lm-eval's ``--device``; its default (``cuda:0``) falls back to the CPU when CUDA is absent.

Differences from lm-eval's ``hf`` model, all documented in :mod:`statelab.eval.scoring`: no rolling windows
(a state-space model has no maximum length: the whole text is read after the prefix token); generation is greedy
only (a request asking for sampling is refused).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from statelab.errors import ConfigError
from statelab.eval import scoring
from statelab.eval.skills import parse_soup, parse_weights, start_state
from statelab.threads import apply_thread_rule

__all__ = ["StatelabLM"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(requested: Any) -> torch.device:
    """lm-eval's ``--device``; CUDA asked for on a machine without it falls back to the CPU, as lm-eval's ``hf``
    model does (its CLI asks for ``cuda:0`` unless told otherwise)."""
    if requested is None:
        return torch.device("cpu")
    dev = torch.device(str(requested))
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; using the CPU", requested)
        return torch.device("cpu")
    return dev


def _row_cap(batch_size: Any, max_batch_size: Any) -> int | None:
    """Rows per pass from lm-eval's ``batch_size`` (an int, or ``auto`` / ``auto:N``: no cap)."""
    if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
        cap = None
    else:
        try:
            cap = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"batch_size must be an int or 'auto', got {batch_size!r}") from None
        if cap < 1:
            raise ConfigError(f"batch_size must be >= 1, got {cap}")
    if max_batch_size is not None:
        cap = int(max_batch_size) if cap is None else min(cap, int(max_batch_size))
    return cap


@register_model("statelab")
class StatelabLM(LM):
    """lm-eval's ``LM`` interface over a statelab model (see the module doc for the arguments)."""

    def __init__(
        self,
        pretrained: str = "embedded",
        tokenizer: str | None = None,
        skill: str | int | None = None,
        store: str | None = None,
        soup: str | None = None,
        mix: str = "mean",
        weights: str | float | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        batch_tokens: int = scoring.DEFAULT_BATCH_TOKENS,
        max_gen_toks: int = scoring.DEFAULT_MAX_GEN_TOKS,
        device: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown model_args {sorted(unknown)} for --model statelab; known: pretrained, tokenizer, skill, "
                "store, soup, mix, weights, dtype, batch_tokens, max_gen_toks (and lm-eval's --batch_size, --device)"
            )
        from statelab.models.loading import load_model
        from statelab.models.tokenizer import load_tokenizer

        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be an int >= 1, got {batch_tokens!r}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 0:
            raise ConfigError(f"max_gen_toks must be an int >= 0, got {max_gen_toks!r}")
        self._device = _device(device)
        self.batch_tokens = batch_tokens
        self.max_rows = _row_cap(batch_size, max_batch_size)
        self.max_gen_toks = max_gen_toks
        self.pretrained = str(pretrained)
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else pretrained)

        soup_names = None if soup is None else parse_soup(str(soup))
        weight_list = None
        if weights is not None:
            weight_list = [float(weights)] if isinstance(weights, int | float) else parse_weights(str(weights))
        skill_name = None if skill is None else str(skill)  # lm-eval turns an all-digit name into an int
        model = load_model(pretrained, dtype=_DTYPES[dtype], device=self._device)
        apply_thread_rule(model, self.batch_tokens)  # statelab.threads: measured rule, STATELAB_THREADS overrides
        # a skill stored from this checkpoint in another dtype (usually fp32) is adopted: cast to this model's
        # state dtype (model.adopt_state); a skill of another model is refused
        state = start_state(
            model, store=store, skill=skill_name, soup=soup_names, mix=mix, weights=weight_list, adopt=True
        )
        self.model = model
        self.start = state
        self.skill, self.soup, self.mix, self.dtype = skill_name, soup_names, mix, dtype

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(Σ log p(continuation | context), is_greedy)`` per request (``req.args = (context, continuation)``)."""
        args = [tuple(r.args) for r in requests]
        pairs = [scoring.encode_pair(self.tokenizer, c, x) for c, x in args]
        return scoring.loglikelihood_tokens(
            self.model,
            pairs,
            state=self.start,
            batch_tokens=self.batch_tokens,
            max_rows=self.max_rows,
            progress=not disable_tqdm,
            on_result=lambda i, res: self.cache_hook.add_partial("loglikelihood", args[i], res),
        )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text (``req.args = (text,)``), read after the prefix token."""
        texts = [r.args[0] for r in requests]
        out = scoring.loglikelihood_rolling(
            self.model,
            self.tokenizer,
            texts,
            state=self.start,
            batch_tokens=self.batch_tokens,
            max_rows=self.max_rows,
            progress=not disable_tqdm,
        )
        for t, lp in zip(texts, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), lp)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each ``(context, gen_kwargs)`` request, cut before its first ``until`` string."""
        args = [tuple(r.args) for r in requests]
        reqs = [(c, scoring.parse_gen_kwargs(kw, self.max_gen_toks)) for c, kw in args]
        out = scoring.generate_until(
            self.model,
            self.tokenizer,
            reqs,
            state=self.start,
            batch_tokens=self.batch_tokens,
            max_rows=self.max_rows,
            progress=not disable_tqdm,
        )
        for a, text in zip(args, out, strict=True):
            self.cache_hook.add_partial("generate_until", a, text)
        return out

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results file."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": self.dtype,
            "model_fingerprint": self.model.fingerprint,
            "statelab_skill": self.skill,
            "statelab_soup": self.soup,
            "statelab_mix": self.mix if self.soup else None,
        }
