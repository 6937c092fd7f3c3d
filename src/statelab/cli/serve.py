"""``statelab serve``: an OpenAI-compatible completions server with skills, batching and a prefix-state cache.

Bad options are one line on stderr with exit code 2; a model, tokenizer or store that cannot be opened (or a
missing ``serve`` extra) is one line with exit code 1 (:mod:`statelab.cli.common`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Annotated

import typer

from statelab.cli.common import CliError, TokenizerOpt, fail_cleanly, tokenizer_for
from statelab.errors import StatelabError

__all__ = ["serve_command", "parse_bytes"]

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"1.5G"``, ``"0"`` -> bytes (K/M/G/T are powers of 1024; a trailing ``B`` or
    ``iB`` is allowed)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"--cache-bytes must be a size such as 1073741824, 512M or 2G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@fail_cleanly
def serve_command(
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory or 'embedded'.", show_default=False)],
    tokenizer: TokenizerOpt = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store", "-s", envvar="STATELAB_STORE", help="State store for skills and soups (created if missing)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Rows (choices) decoded together at most.")] = 16,
    cache_bytes: Annotated[
        str, typer.Option("--cache-bytes", help="Prefix-state cache budget, e.g. 1G or 512M (0: no cache).")
    ] = "1G",
    block_tokens: Annotated[
        int,
        typer.Option(
            "--block-tokens",
            help="Tokens between cached states: a shared prefix is re-read from the last boundary before its end "
            "(64: a 2,000-token prefix re-reads at most 64 tokens; larger blocks keep fewer states).",
        ),
    ] = 64,
    max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Longest prompt accepted.")] = 8192,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most new tokens per choice.")] = 2048,
    device: Annotated[str, typer.Option(help="Device for the model: cpu, cuda, cuda:1, ...")] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(help="torch intra-op threads (default: statelab.threads' rule: 1 for small work or busy cores)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Serve MODEL over HTTP: OpenAI-compatible /v1/completions (with statelab's skill and soup fields),
    /v1/models, /v1/skills, /v1/skills/search and /metrics.

    Concurrent requests are decoded together in one ragged batch; states at block boundaries of prompts are kept
    in a prefix cache, so a prompt that shares a prefix with an earlier one reads only its new tokens.

    Example: statelab serve --model embedded -s skills --port 8000
    """
    try:
        budget = parse_bytes(cache_bytes)
    except ValueError as e:
        raise CliError(str(e)) from None
    for name, value, lo in (
        ("--max-batch", max_batch, 1),
        ("--block-tokens", block_tokens, 1),
        ("--max-prompt-tokens", max_prompt_tokens, 1),
        ("--max-tokens", max_tokens, 0),
    ):
        if value < lo:
            raise CliError(f"{name} must be >= {lo}, got {value}")
    if threads is not None and threads < 1:
        raise CliError(f"--threads must be >= 1, got {threads}")
    if not 0 <= port <= 65535:
        raise CliError(f"--port must lie in [0, 65535], got {port}")
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level not in levels:
        raise CliError(f"--log-level must be one of {', '.join(levels)}, got {log_level!r}")

    from statelab.serve.app import require_serve_extra

    try:
        require_serve_extra()
    except ImportError as e:
        raise StatelabError(str(e)) from None

    import torch

    from statelab.models.loading import load_model
    from statelab.serve.app import BackgroundServer, ServeConfig, create_app, default_model_id
    from statelab.threads import COMMAND_WORK_TOKENS, apply_thread_rule

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CliError(f"--device: {e}") from None
    try:
        m = load_model(model, device=dev)
        apply_thread_rule(m, COMMAND_WORK_TOKENS, threads)
        tok = tokenizer_for(model, m, tokenizer)
        st = None
        if store is not None:
            from statelab.state.store import StateStore

            st = StateStore(store)
    except RuntimeError as e:  # torch's, e.g. a CUDA device that is not there
        raise StatelabError(str(e)) from None
    config = ServeConfig(
        model_id=default_model_id(model),
        max_batch=max_batch,
        cache_bytes=budget,
        block_tokens=block_tokens,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
    )
    app = create_app(m, tok, config, store=st)
    try:
        server = BackgroundServer(app, host=host, port=port, log_level=log_level)
    except OSError as e:
        raise StatelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    params = sum(p.numel() for p in m.parameters())
    cache = f"{budget / 2**20:.0f} MiB in blocks of {block_tokens} tokens" if budget else "off"
    typer.echo(
        f"statelab serve: {config.model_id} ({m.arch}, {params / 1e6:.1f}M parameters, {dev}) on {server.url}; "
        f"store: {st.path if st is not None else 'none'}; max batch {max_batch}; prefix cache {cache}",
        err=True,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled after shutting down
        server.run()
