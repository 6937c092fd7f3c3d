"""``statelab store …`` and ``statelab search``: the state store from the command line.

Every command takes the store directory as ``--store`` (or the ``STATELAB_STORE`` environment variable), prints a
table for people or JSON with ``--json``, and reports a failure as one line on stderr with exit code 1.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from statelab.errors import StatelabError

__all__ = ["store_app", "search_command"]

store_app = typer.Typer(
    name="store",
    help="Keep states in a store: add, list, show, get, rm, check, export, import.\n\n"
    "Example: statelab store --help; statelab store list --store skills",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

StoreOpt = Annotated[
    Path, typer.Option("--store", "-s", envvar="STATELAB_STORE", help="Store directory (created if missing).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn statelab errors (and unreadable files) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (StatelabError, OSError) as e:
            msg = str(e) if isinstance(e, StatelabError) else f"{e.strerror or e}: {getattr(e, 'filename', '')}"
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _open(store: Path, index: str = "exact"):
    from statelab.state.store import StateStore

    return StateStore(store, index=index)


def _emit(as_json: bool, payload: Any, table: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=1, sort_keys=True))
    else:
        table()


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


@store_app.command("add")
@_fail_cleanly
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
    entry = _open(store).add(
        state, name=name, task=task, tags=tag or (), description=description, prompt=prompt, shots=shots
    )
    _emit(as_json, entry.to_dict(), lambda: typer.echo(f"added {entry.name} (id {entry.id}, blob {entry.blob[:12]})"))


@store_app.command("list")
@_fail_cleanly
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
    _emit(as_json, [e.to_dict() for e in entries], lambda: _entries_table(entries, f"{store} ({len(entries)})"))


@store_app.command("show")
@_fail_cleanly
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

    _emit(as_json, entry.to_dict(), table)


@store_app.command("get")
@_fail_cleanly
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
    _emit(as_json, {"name": entry.name, "path": str(out)}, lambda: typer.echo(f"wrote {out}"))


@store_app.command("rm")
@_fail_cleanly
def rm_command(
    name: Annotated[list[str], typer.Argument(help="Entry names or ids.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Remove entries (their state files go when no other entry shares them).

    Example: statelab store rm sst2-a sst2-b -s skills
    """
    st = _open(store)
    removed = [st.remove(n).name for n in name]
    _emit(as_json, {"removed": removed}, lambda: typer.echo(f"removed {', '.join(removed)}"))


@store_app.command("check")
@_fail_cleanly
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
    _emit(as_json, report.to_dict(), lambda: typer.echo(report.summary()))
    if not (report.ok or repair):
        raise typer.Exit(1)


@store_app.command("export")
@_fail_cleanly
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
    _emit(as_json, {"archive": str(archive), "entries": n}, lambda: typer.echo(f"exported {n} entries to {archive}"))


@store_app.command("import")
@_fail_cleanly
def import_command(
    archive: Annotated[Path, typer.Argument(help="Archive written by `statelab store export`.")],
    store: StoreOpt,
    as_json: JsonOpt = False,
) -> None:
    """Import an archive; every state is verified first, and nothing is added unless all of it can be.

    Example: statelab store import skills.tar -s other-store
    """
    added = _open(store).import_(archive)
    names = [e.name for e in added]
    _emit(as_json, {"imported": names}, lambda: typer.echo(f"imported {len(names)} entries"))


@_fail_cleanly
def search_command(
    query: Annotated[Path, typer.Argument(help="State file of the query (e.g. a short k-shot prompt).")],
    store: StoreOpt,
    k: Annotated[int, typer.Option("-k", help="Number of hits.")] = 5,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (default: the store's).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Drop hits scoring below this cosine.")] = None,
    index: Annotated[str, typer.Option(help="exact, sketch, faiss, faiss-ivf or usearch.")] = "exact",
    rerank: Annotated[int, typer.Option(help="Re-score this many sketch candidates exactly.")] = 0,
    task: Annotated[str | None, typer.Option(help="Only entries of this task.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the stored states most similar to a query state (cosine of the middle layers' SSM states).

    Prints "no match" (or ``[]`` with --json) when every hit scores below --threshold; that is not an error.

    Example: statelab search query-2shot.safetensors -s skills -k 3 --threshold 0.8 --json
    """
    from statelab.state.io import load_state

    layer_list = None
    if layers:
        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise StatelabError(f"--layers must be comma-separated integers, got {layers!r}") from None
    hits = _open(store, index).search(load_state(query), k=k, layers=layer_list, threshold=threshold,
                                      rerank=rerank, task=task)  # fmt: skip

    def table() -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"top {k} in {store}")
        for col in ("rank", "name", "id", "task", "score"):
            t.add_column(col)
        for i, h in enumerate(hits, 1):
            t.add_row(str(i), h.name, str(h.id), h.task or "", f"{h.score:.4f}")
        Console().print(t)

    if not hits and not as_json:
        typer.echo("no match")
    else:
        _emit(as_json, [h.to_dict() for h in hits], table)
