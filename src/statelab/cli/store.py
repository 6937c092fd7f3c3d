"""``statelab store …`` and ``statelab search``: the state store from the command line.

Every command takes the store directory as ``--store`` (or the ``STATELAB_STORE`` environment variable), prints a
table for people or JSON with ``--json``, and reports a failure as one line on stderr with the exit codes of
:mod:`statelab.cli.common` (a warning, such as a rebuilt index cache, is one line starting with ``warning:``).
Only ``init``, ``add``, ``ingest`` and ``import`` create a store; the other commands refuse a path that holds
none, so a mistyped ``--store`` is an error and not a new empty store. A store this user cannot write (read-only
mount, another user's) can be read.
``store ingest`` encodes a JSONL file of prompts with a model and adds them all in one transaction; ``search``
takes a query state file or a ``--text`` to encode, and every hit carries its entry's stored prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from statelab.cli.common import (
    CliError,
    JsonOpt,
    NoProgressOpt,
    TokenizerOpt,
    emit,
    fail_cleanly,
    int_list,
    load_model_and_tokenizer,
)
from statelab.errors import StatelabError, StoreError
from statelab.jsonl import json_lines

__all__ = ["store_app", "search_command", "read_prompts_jsonl", "INGEST_KEYS"]

store_app = typer.Typer(
    name="store",
    help="Keep states in a store: init, add, ingest, list, show, get, rm, check, export, import.\n\n"
    "Example: statelab store --help; statelab store list --store skills",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

StoreOpt = Annotated[
    Path,
    typer.Option(
        "--store", "-s", envvar="STATELAB_STORE", help="Store directory (init, add, ingest and import create it)."
    ),
]


def _open(store: Path, index: str = "exact", *, create: bool = False):
    """The store at ``store``; only the commands that add entries pass ``create=True``."""
    from statelab.state.store import StateStore

    return StateStore(store, index=index, create=create)


def _short(prompt: str | None, width: int = 60) -> str:
    """A prompt on one table line: newlines shown as ``\\n``, cut to ``width`` characters."""
    if prompt is None:
        return ""
    flat = prompt.replace("\\", "\\\\").replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _entries_table(entries: list, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("id", "name", "task", "tags", "shots", "tokens", "model", "created"):
        t.add_column(col)
    for e in entries:
        t.add_row(
            str(e.id), e.name, e.task or "", ",".join(e.tags), "" if e.shots is None else str(e.shots),
            str(e.n_tokens), e.fingerprint[:12], e.created[:19],
        )  # fmt: skip
    Console().print(t)


@store_app.command("init")
@fail_cleanly
def init_command(
    store: StoreOpt,
    sketch_dim: Annotated[int | None, typer.Option(help="Sketch dimension (default 256).")] = None,
    sketch_seed: Annotated[int | None, typer.Option(help="Sketch hash seed (default 0).")] = None,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers to search (default: middle).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an empty store (or check that an existing one has these settings).

    Example: statelab store init -s skills
    """
    from statelab.state.store import StateStore

    layer_list = int_list(layers, "--layers") or None
    existed = (store / "store.db").is_file()
    st = StateStore(store, sketch_dim=sketch_dim, sketch_seed=sketch_seed, layers=layer_list, create=True)
    info = {"store": str(store), "created": not existed, "entries": len(st), "sketch_dim": st.sketch_dim}
    emit(as_json, info, lambda: typer.echo(f"{'store exists' if existed else 'created store'} {store}"))


@store_app.command("add")
@fail_cleanly
def add_command(
    state_file: Annotated[Path, typer.Argument(help="A state file written by `statelab encode` or State.save.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Unique entry name.")],
    store: StoreOpt,
    task: Annotated[str | None, typer.Option(help="Task label (what search reports).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="A tag; repeat for more.")] = None,
    description: Annotated[str | None, typer.Option(help="Free text.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (default: the one in the state file).")] = None,
    shots: Annotated[int | None, typer.Option(help="Number of demonstrations in the prompt.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a state file to the store under a new name.

    Example: statelab store add sst2-32shot.safetensors --name sst2-a --task sst2 --tag sentiment --shots 32 -s skills
    """
    from statelab.state.io import load_state, read_metadata

    state = load_state(state_file)
    if prompt is None:
        prompt = read_metadata(state_file).get("prompt")
    entry = _open(store, create=True).add(
        state, name=name, task=task, tags=tag or (), description=description, prompt=prompt, shots=shots
    )
    emit(as_json, entry.to_dict(), lambda: typer.echo(f"added {entry.name} (id {entry.id}, blob {entry.blob[:12]})"))


#: the keys of one ``store ingest`` line, and the type each value must have (``tags``: a list of strings)
INGEST_KEYS: dict[str, type] = {"name": str, "prompt": str, "task": str, "tags": list, "description": str, "shots": int}


def read_prompts_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a ``store ingest`` file, all checked first.

    Each line is a JSON object with ``name`` and ``prompt`` (non-empty strings) and optionally ``task``,
    ``tags`` (a list of non-empty strings), ``description`` and ``shots`` (an int >= 0). Raises ``StoreError``
    naming the line for invalid JSON, a missing or mistyped key, an unknown key, or a name already used on an
    earlier line; and for a file without any prompt.
    """

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StoreError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[int, dict[str, Any]]] = []
    first_line: dict[str, int] = {}
    for n, where, obj in json_lines(text, StoreError, lambda n: f"{path} line {n}"):
        if not isinstance(obj, dict):
            raise StoreError(f"{where}: expected a JSON object with name and prompt, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(INGEST_KEYS))
        if unknown:
            raise StoreError(f"{where}: unknown key(s) {unknown}; a line may have {', '.join(INGEST_KEYS)}")
        for key in ("name", "prompt"):
            if key not in obj:
                raise StoreError(f"{where}: no {key!r}; every line needs a name and a prompt")
        for key, want in INGEST_KEYS.items():
            v = obj.get(key)
            if key in obj and (isinstance(v, bool) or not isinstance(v, want)):
                raise StoreError(f"{where}: {key!r} must be a {want.__name__}, got {json.dumps(v)[:40]}")
        for key in ("name", "prompt"):
            if not obj[key].strip():
                raise StoreError(f"{where}: {key!r} is empty")
        if any(not isinstance(t, str) or not t for t in obj.get("tags", [])):
            raise StoreError(f"{where}: 'tags' must be a list of non-empty strings, got {json.dumps(obj['tags'])[:60]}")
        if obj.get("shots", 0) < 0:
            raise StoreError(f"{where}: 'shots' must be >= 0, got {obj['shots']}")
        if obj["name"] in first_line:
            raise StoreError(f"{where}: name {obj['name']!r} is already used on line {first_line[obj['name']]}")
        first_line[obj["name"]] = n
        out.append((n, obj))
    if not out:
        raise StoreError(f"{path} holds no prompts (one JSON object per line, with name and prompt)")
    return out


@store_app.command("ingest")
@fail_cleanly
def ingest_command(
    prompts: Annotated[Path, typer.Argument(help="JSONL file: one {name, prompt, task?, tags?, description?} a line.")],
    store: StoreOpt,
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory, 'embedded' or a hub id.")],
    tokenizer: TokenizerOpt = None,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", help="Padded tokens per batch (rows x longest prompt).")
    ] = 8192,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode every prompt of a JSONL file with MODEL and add the states to the store in one transaction.

    The whole file is checked first (JSON, keys and types, names unique in the file and new to the store); a bad
    line is reported with its number and nothing is added. Prompts are encoded in length-bucketed batches, each
    state equal to encoding its prompt alone.

    Example: statelab store ingest prompts.jsonl -s skills --model embedded
    """
    import time

    from statelab.models.batching import EmptyTextError, encode_texts
    from statelab.state.store import NewEntry

    lines = read_prompts_jsonl(prompts)
    st = _open(store, create=True)
    if st.read_only:  # say so before the model is loaded and every prompt encoded
        raise StoreError(f"store {store} is read-only ({st.read_only}): cannot ingest; nothing was changed")
    for n, obj in lines:
        if obj["name"] in st:
            raise StoreError(f"{prompts} line {n}: store {store} already has an entry named {obj['name']!r}")
    m, tok = load_model_and_tokenizer(model, tokenizer)
    t0 = time.perf_counter()
    try:
        states = encode_texts(m, tok, [obj["prompt"] for _, obj in lines], batch_tokens=batch_tokens,
                              progress=not no_progress)  # fmt: skip
    except EmptyTextError as e:
        raise StoreError(f"{prompts} line {lines[e.indices[0]][0]}: the prompt gives no tokens") from None
    seconds = time.perf_counter() - t0
    items = [
        NewEntry(obj["name"], s, task=obj.get("task"), tags=obj.get("tags", ()), description=obj.get("description"),
                 prompt=obj["prompt"], shots=obj.get("shots"))
        for (_, obj), s in zip(lines, states, strict=True)
    ]  # fmt: skip
    added = st.add_many(items)
    tokens = sum(s.n_tokens for s in states)
    info = {"store": str(store), "added": len(added), "names": [e.name for e in added], "tokens": tokens,
            "encode_seconds": round(seconds, 3)}  # fmt: skip
    emit(as_json, info, lambda: typer.echo(
        f"added {len(added)} entries to {store} ({tokens} tokens encoded at {tokens / max(seconds, 1e-9):,.0f} tok/s)"
    ))  # fmt: skip


@store_app.command("list")
@fail_cleanly
def list_command(
    store: StoreOpt,
    task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="Only entries with this tag (repeat).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's states (fingerprint or a prefix).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List entries, optionally filtered by task, tags or model.

    Example: statelab store list --task sst2 --tag sentiment -s skills --json
    """
    entries = _open(store).list(task=task, tags=tag, fingerprint=model)
    emit(as_json, [e.to_dict() for e in entries], lambda: _entries_table(entries, f"{store} ({len(entries)})"))


@store_app.command("show")
@fail_cleanly
def show_command(
    name: Annotated[str, typer.Argument(help="Entry name or id.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Show one entry's metadata.

    Example: statelab store show sst2-a -s skills
    """
    entry = _open(store).entry(name)

    def table() -> None:
        for key, value in entry.to_dict().items():
            typer.echo(f"{key:12s} {value}")

    emit(as_json, entry.to_dict(), table)


@store_app.command("get")
@fail_cleanly
def get_command(
    name: Annotated[str, typer.Argument(help="Entry name or id.")],
    out: Annotated[Path, typer.Argument(help="Where to write the state file.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Write a stored state to a state file (verified on the way out).

    Example: statelab store get sst2-a sst2-a.safetensors -s skills
    """
    st = _open(store)
    entry = st.entry(name)
    st.get(name).save(out, prompt=entry.prompt)
    emit(as_json, {"name": entry.name, "path": str(out)}, lambda: typer.echo(f"wrote {out}"))


@store_app.command("rm")
@fail_cleanly
def rm_command(
    name: Annotated[list[str], typer.Argument(help="Entry names or ids.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Remove entries (their state files go when no other entry shares them): all of them, or none if one is
    missing.

    Example: statelab store rm sst2-a sst2-b -s skills
    """
    removed = [e.name for e in _open(store).remove_many(name)]  # one transaction: all of them or none
    emit(as_json, {"removed": removed}, lambda: typer.echo(f"removed {', '.join(removed)}"))


@store_app.command("check")
@fail_cleanly
def check_command(
    store: StoreOpt,
    repair: Annotated[bool, typer.Option(help="Delete debris and drop entries whose state is lost.")] = False,
    quick: Annotated[bool, typer.Option(help="Only check that state files exist; do not verify them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check the store: orphan state files, missing or corrupt ones, leftovers of interrupted writes.

    Exit code 1 if problems remain (not repaired).

    Example: statelab store check --repair -s skills
    """
    report = _open(store).check(repair=repair, verify=not quick)
    emit(as_json, report.to_dict(), lambda: typer.echo(report.summary()))
    if not (report.ok or repair):
        raise typer.Exit(1)


@store_app.command("export")
@fail_cleanly
def export_command(
    archive: Annotated[Path, typer.Argument(help="Archive file to write (a tar).")],
    store: StoreOpt,
    name: Annotated[list[str] | None, typer.Option("--name", "-n", help="Only this entry (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export entries (all by default) with their states to one archive file.

    Example: statelab store export skills.tar -s skills
    """
    n = _open(store).export(archive, names=name)
    emit(as_json, {"archive": str(archive), "entries": n}, lambda: typer.echo(f"exported {n} entries to {archive}"))


@store_app.command("import")
@fail_cleanly
def import_command(
    archive: Annotated[Path, typer.Argument(help="Archive written by `statelab store export`.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Import an archive; every state is verified first, and nothing is added unless all of it can be.

    Example: statelab store import skills.tar -s other-store
    """
    added = _open(store, create=True).import_(archive)
    names = [e.name for e in added]
    emit(as_json, {"imported": names}, lambda: typer.echo(f"imported {len(names)} entries"))


@fail_cleanly
def search_command(
    store: StoreOpt,
    query: Annotated[
        Path | None, typer.Argument(help="State file of the query (e.g. a short k-shot prompt); or use --text.")
    ] = None,
    text: Annotated[str | None, typer.Option("--text", "-t", help="Query text, encoded with --model.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model that encodes --text (with a query file: checks it).")
    ] = None,
    tokenizer: TokenizerOpt = None,
    k: Annotated[int, typer.Option("-k", help="Number of hits.")] = 5,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: the store's).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Drop hits scoring below this cosine.")] = None,
    index: Annotated[str, typer.Option(help="exact, sketch, faiss, faiss-ivf or usearch.")] = "exact",
    rerank: Annotated[int, typer.Option(help="Re-score this many sketch candidates exactly.")] = 0,
    task: Annotated[str | None, typer.Option(help="Only entries of this task.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the stored states most similar to a query (cosine of the middle layers' SSM states).

    The query is a state file, or a text that --model encodes (--text; give one or the other). Each hit carries
    its entry's stored prompt. Prints "no match" (or ``[]`` with --json) when every hit scores below
    --threshold; that is not an error.

    Example: statelab search query-2shot.safetensors -s skills -k 3 --threshold 0.8 --json

    Example: statelab search --text $'Q: dog\\nA: DOG\\n\\n' --model embedded -s skills
    """
    from statelab.state.io import load_state

    if (query is None) == (text is None):
        raise CliError("give a query state file or --text (with --model), not both" if query else
                       "give a query: a state file, or --text with --model")  # fmt: skip
    if text is not None and model is None:
        raise CliError("--text needs --model: the query text is encoded by the model whose states the store holds")
    if tokenizer is not None and text is None:
        raise CliError("--tokenizer only applies to --text")
    layer_list = int_list(layers, "--layers") or None
    if text is not None:
        import torch

        m, tok = load_model_and_tokenizer(model, tokenizer)  # type: ignore[arg-type]  (checked above)
        ids = torch.tensor([tok.encode(text)], dtype=torch.long)
        if ids.shape[1] == 0:
            raise StatelabError("--text is empty: the query needs at least one token")
        query_state = m.encode(ids)
    else:
        if model is not None:
            from statelab.models.loading import load_model

            query_state = load_state(query, load_model(model))
        else:
            query_state = load_state(query)
    hits = _open(store, index).search(query_state, k=k, layers=layer_list, threshold=threshold,
                                      rerank=rerank, task=task)  # fmt: skip

    def table() -> None:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text  # a prompt is shown as it is, never read as rich markup

        t = Table(title=f"top {k} in {store}")
        for col in ("rank", "name", "id", "task", "score", "prompt"):
            t.add_column(col)
        for i, h in enumerate(hits, 1):
            t.add_row(str(i), h.name, str(h.id), h.task or "", f"{h.score:.4f}", Text(_short(h.prompt)))
        Console().print(t)

    if not hits and not as_json:
        typer.echo("no match")
    else:
        emit(as_json, [h.to_dict() for h in hits], table)
