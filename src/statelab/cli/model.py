"""``statelab encode | mix | generate | score``: make, combine and use states from the command line.

``MODEL`` is a checkpoint directory (Hugging Face or mamba_ssm format), ``"embedded"`` or a hub id. Commands that
read text use MODEL's own tokenizer files, or the one named by ``--tokenizer`` (required when MODEL has none, as
mamba_ssm checkpoints do). States are state files (``statelab.save_state``). Every command prints a short summary
for people or JSON with ``--json``; errors and exit codes follow :mod:`statelab.cli.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from statelab.cli.common import (
    CliError,
    JsonOpt,
    TokenizerOpt,
    emit,
    fail_cleanly,
    int_list,
    load_model_and_tokenizer,
)
from statelab.errors import StatelabError

__all__ = ["encode_command", "mix_command", "generate_command", "score_command"]

ModelArg = Annotated[str, typer.Argument(help="Checkpoint directory, 'embedded' or a hub id.", show_default=False)]


def _text(text: str | None, file: Path | None, what: str = "--text") -> str:
    if (text is None) == (file is None):
        raise CliError(f"give exactly one of {what} or --file")
    if file is not None:
        return file.read_text(encoding="utf-8")
    assert text is not None
    return text


def _ids(tokenizer: Any, text: str):
    import torch

    return torch.tensor([tokenizer.encode(text)], dtype=torch.long)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    vocab = getattr(tokenizer, "vocab_size", None)
    return tokenizer.decode([i for i in ids if vocab is None or i < vocab])


def _floats(s: str | None, name: str) -> list[float] | None:
    if s is None:
        return None
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{name} must be comma-separated numbers, got {s!r}") from None


def _state_info(state: Any) -> dict[str, Any]:
    return {
        "arch": state.arch,
        "layers": state.num_layers,
        "batch": state.batch_size,
        "n_tokens": state.n_tokens,
        "dtype": str(state.dtype).removeprefix("torch."),
        "fingerprint": state.fingerprint,
    }


@fail_cleanly
def encode_command(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="State file to write (.safetensors).")],
    text: Annotated[str | None, typer.Option("--text", "-t", help="Text to read.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Continue from this state file.")] = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read a text with MODEL and save the state after it (with the prompt, token ids and tokenizer hash).

    Example: statelab encode embedded --text $'Q: cat\\nA: CAT\\n\\n' -o upper-1shot.safetensors
    """
    from statelab.state.io import load_state, save_state

    m, tok = load_model_and_tokenizer(model, tokenizer)
    prompt = _text(text, file)
    ids = _ids(tok, prompt)
    if ids.shape[1] == 0:
        raise StatelabError("the text is empty: nothing to encode")
    start = load_state(state, m) if state is not None else None
    s = m.encode(ids, state=start)
    save_state(s, output, prompt=prompt, token_ids=ids[0].tolist(), tokenizer_hash=tok.fingerprint)
    info = {"output": str(output), "tokens_read": int(ids.shape[1]), "bytes": output.stat().st_size, **_state_info(s)}
    emit(as_json, info, lambda: typer.echo(f"wrote {output}: {ids.shape[1]} tokens read, state after {s.n_tokens}"))


def _state_or_entry(ref: str, store: Any, model: Any) -> Any:
    """The state ``ref`` names: an entry of ``store`` (when given) or a state file; checked against ``model``."""
    from statelab.state.io import load_state

    path = Path(ref)
    if store is None:
        return load_state(path, model)
    is_entry = ref in store
    if is_entry and path.exists():
        raise CliError(f"{ref!r} is both an entry of {store.path} and a file; write the file as ./{ref} to mean it")
    if is_entry:
        return store.get(ref, model)
    if not path.exists():
        raise StatelabError(f"{ref!r} is neither an entry of {store.path} nor a state file")
    return load_state(path, model)


def _mix_help() -> str:
    from statelab.state.mix import MIX_METHODS

    return ", ".join(sorted(MIX_METHODS))


@fail_cleanly
def mix_command(
    states: Annotated[
        list[str], typer.Argument(help="State files, or entry names of --store, in order for ordered methods.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="State file to write.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Mixing method (see `statelab mix --help`).")] = "mean",
    weights: Annotated[str | None, typer.Option(help="Comma-separated weights, one per state.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model of the states: checks them; gives A to the ordered methods.")
    ] = None,
    conv: Annotated[str | None, typer.Option(help="Conv-state policy: mean, first, last, base or zero.")] = None,
    base: Annotated[str | None, typer.Option(help="Base state file or entry (task_arithmetic, layers).")] = None,
    store: Annotated[
        Path | None, typer.Option("--store", "-s", help="State store whose entry names STATES and --base may use.")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (method 'layers').")] = None,
    inner: Annotated[str | None, typer.Option(help="Inner method of 'layers' (weighted, mean, ...).")] = None,
    scores: Annotated[str | None, typer.Option(help="Comma-separated similarities (softmax_topk).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature (softmax_topk).")] = None,
    k: Annotated[int | None, typer.Option("-k", help="Keep the k best hits (softmax_topk).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Drop hits below this score (softmax_topk).")] = None,
    typical: Annotated[str | None, typer.Option(help="norm_matched target: mean or max of member norms.")] = None,
    cutoff: Annotated[float | None, typer.Option(help="hybrid: mean log-decay per chunk below which adecay.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Mix states into one with a registered method and save it.

    Each STATE is a state file or, with --store, the name (or id) of a store entry; files and entries can be
    mixed. A name that is both an entry and a file is refused: write the file as ./NAME.

    Methods: adecay, append, hybrid, layers, mean, norm_matched, picaso_r, picaso_s, softmax_topk, sum,
    task_arithmetic, weighted. Ordered methods (adecay, append, hybrid, picaso_*) need --model for the decay A.

    Example: statelab mix a.safetensors b.safetensors --method weighted --weights 0.7,0.3 -o soup.safetensors

    Example: statelab mix upper/0 upper/1 query.safetensors -s skills -o soup.safetensors
    """
    import inspect

    from statelab.state.io import save_state
    from statelab.state.mix import MIX_METHODS, mix

    fn = MIX_METHODS.get(method)
    if fn is None:
        raise CliError(f"unknown mixing method {method!r}; known: {_mix_help()}")
    m = None
    if model is not None:
        from statelab.models.loading import load_model

        m = load_model(model)
    st = None
    if store is not None:
        from statelab.state.store import StateStore

        if not store.is_dir():
            raise StatelabError(f"--store {store} does not exist")
        st = StateStore(store, create=False)
    loaded = [_state_or_entry(ref, st, m) for ref in states]
    given: dict[str, Any] = {
        "conv": conv,
        "base": None if base is None else _state_or_entry(base, st, m),
        "layers": int_list(layers, "--layers"),
        "inner": inner,
        "scores": _floats(scores, "--scores"),
        "temperature": temperature,
        "k": k,
        "threshold": threshold,
        "typical": typical,
        "cutoff": cutoff,
    }
    accepted = set(inspect.signature(fn).parameters)
    options = {key: v for key, v in given.items() if v is not None}
    extra = sorted(set(options) - accepted)
    if extra:
        raise CliError(f"method {method!r} takes no --{', --'.join(extra)}")
    if "A" in accepted:
        if m is None:
            raise CliError(f"method {method!r} composes states in order and needs --model (for A = -exp(A_log))")
        options["A"] = m.decay_A().detach()
    out = mix(loaded, method, _floats(weights, "--weights"), **options)
    record = {"method": method, "inputs": list(states), "weights": weights, "conv": conv}
    if store is not None:
        record["store"] = str(store)
    save_state(out, output, extra={"mix": record})
    info = {"output": str(output), "method": method, "inputs": len(states), **_state_info(out)}
    emit(as_json, info, lambda: typer.echo(f"wrote {output}: {method} of {len(states)} states"))


@fail_cleanly
def generate_command(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue (at least one token).")],
    state: Annotated[Path | None, typer.Option("--state", help="Start from this state file (a skill, a soup).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampler.")] = None,
    stop_at_eos: Annotated[bool, typer.Option(help="Stop at the tokenizer's end-of-sequence token.")] = True,
    save: Annotated[Path | None, typer.Option("--save-state", help="Write the state after generation here.")] = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt with MODEL, optionally from a stored or mixed state.

    Example: statelab generate embedded --state upper-soup.safetensors --prompt $'Q: dog\\nA:' -n 8
    """
    from statelab.state.io import load_state, save_state

    m, tok = load_model_and_tokenizer(model, tokenizer)
    ids = _ids(tok, prompt)
    if ids.shape[1] == 0:
        raise StatelabError("--prompt is empty: generation needs at least one token to continue from")
    start = load_state(state, m) if state is not None else None
    eos = getattr(tok, "eos_token_id", None) if stop_at_eos else None
    new, after, _ = m.generate(
        ids, max_new_tokens, state=start, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos, seed=seed,
    )  # fmt: skip
    new_ids = new[0].tolist()
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    text = _decode(tok, new_ids)
    if save is not None:
        save_state(after, save, token_ids=ids[0].tolist() + new[0].tolist(), tokenizer_hash=tok.fingerprint)
    info = {"text": text, "token_ids": new_ids, "n_tokens": after.n_tokens}
    emit(as_json, info, lambda: typer.echo(text))


@fail_cleanly
def score_command(
    model: ModelArg,
    text: Annotated[str | None, typer.Option("--text", "-t", help="Text to score.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Score the text after this state.")] = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-token log-probabilities and perplexity of a text under MODEL (after a state, if given).

    The first token has no prediction (a state does not carry the logits of the token before it), so T tokens
    give T - 1 scores.

    Example: statelab score embedded --text $'Q: dog\\nA: DOG\\n' --state upper-soup.safetensors --json
    """
    from statelab.state.io import load_state

    m, tok = load_model_and_tokenizer(model, tokenizer)
    ids = _ids(tok, _text(text, file))
    if ids.shape[1] < 2:
        raise StatelabError(f"score needs a text of at least 2 tokens, got {ids.shape[1]}")
    start = load_state(state, m) if state is not None else None
    res = m.score(ids, state=start)
    lp = res.logprobs[0].tolist()
    tokens = ids[0].tolist()
    per_token = [{"token_id": t, "text": _decode(tok, [t]), "logprob": v} for t, v in zip(tokens[1:], lp, strict=True)]
    info = {
        "perplexity": float(res.perplexity[0]),
        "mean_logprob": sum(lp) / len(lp),
        "n_scored": len(lp),
        "tokens": per_token,
    }

    def text_out() -> None:
        ppl, mean = info["perplexity"], info["mean_logprob"]
        typer.echo(f"perplexity {ppl:.4f} over {len(lp)} tokens (mean log-prob {mean:.4f})")

    emit(as_json, info, text_out)
