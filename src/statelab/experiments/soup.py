"""The State Soup experiment (arXiv 2406.08423): skills as states, retrieved from a few examples, mixed.

``statelab soup run [--model PATH_OR_embedded] [--config FILE] [key=value ...]`` runs five studies on any statelab
model (the embedded one by default) and writes ``<out_dir>/<name>/`` with ``report.md``, PNG plots,
``results.json`` and the config:

1. **Skill library.** For every task, ``library_sets`` disjoint ``library_shots``-shot prompts from the task's
   train split are encoded from the zero state and added to a :class:`statelab.StateStore` (task name as label).
2. **Retrieval.** First the retrieval layers and feature are chosen inside the library
   (:mod:`statelab.state.retrieval`): leave-one-set-out, the first ``k`` demonstrations of each held-out library
   prompt are queries against the other sets; the choice is recorded in the store for the model, so
   ``store.search`` uses it. Then held-out ``k``-shot queries (test split) are encoded; the task of the top-1
   store hit is the prediction. Accuracy vs ``k`` for the choice, and for every option tried.
3. **Few-shot accuracy per task**, greedy exact match of the answer and its terminator, from these states:
   zero state (0-shot); the item's own ``icl_shots``-shot prompt; the retrieved skill (top-1 library state for
   that prompt's state); that prompt's state mixed with the soup of the retrieved task's library states; the
   prompt read from the retrieved skill's state, and from the soup's (ordered: skill first, then the query); the
   prompt read from the likeliest of the top retrieved tasks' skills or no skill (judged by the likelihood of the
   prompt's own tokens, no test item involved); A-decay composition of the skill and the prompt's state; a
   ``library_shots``-shot prompt; the mean of the same number of one-shot states; their norm-matched mean.
4. **Ordered composition.** Long sequences are cut into equal chunks encoded independently from zero; the
   continuation's perplexity is measured from ``adecay`` of the chunk states, their ``mean``, the last chunk
   alone, the full pass and no context (and ``adecay`` of chunks encoded with conv context).
5. **Cross-task mixing.** For pairs of related tasks, accuracy on each task from either task's state and from
   their mixtures.

Greedy exact match is computed by teacher forcing: greedy decoding emits the answer iff the argmax at every answer
position (given the correct prefix) is the answer token, so one batched forward pass scores a whole set of items
exactly, each item from its own start state (its prompt's state, a retrieved skill, a soup). Prompts are encoded in
bulk (:func:`statelab.encode_texts`: length-bucketed ragged batches, each state equal to its prompt encoded alone).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statelab.config import apply_overrides, from_dict, read_config_file, to_dict
from statelab.errors import ConfigError, StatelabError
from statelab.eval.icl import Prompter, exact_match
from statelab.state.core import State
from statelab.state.retrieval import FEATURES

__all__ = [
    "SoupConfig",
    "load_soup_config",
    "TaskData",
    "SoupRunner",
    "pick_threads",
    "set_threads",
    "LineProgress",
    "run_soup",
    "ICL_METHODS",
]

#: the few-shot conditions, in report order
ICL_METHODS = (
    "0-shot",
    "k-shot prompt",
    "retrieved skill",
    "query + retrieved soup",
    "retrieved skill, then the query",
    "retrieved soup, then the query",
    "likeliest skill, then the query",
    "adecay(skill, query)",
    "32-shot prompt",
    "mean of one-shot states",
    "norm-matched mean",
)


@dataclass(frozen=True)
class SoupConfig:
    """Everything one State Soup run depends on (saved as ``config.json`` beside the report).

    Attributes:
        name: run name; results go to ``<out_dir>/<name>/``.
        out_dir: parent directory of runs.
        model: checkpoint directory, hub id or ``"embedded"``.
        tokenizer: ``""`` for the checkpoint's own tokenizer, else ``"byte"`` or a tokenizer path.
        seed: seed of every random choice (examples, prompts, sequences).
        tasks: word-function tasks to use; empty for every task of the suite.
        max_tasks: keep only the first this many tasks (0: all).
        template: demonstration template with ``{x}`` and ``{y}``; empty for the suite's default.
        library_sets: disjoint prompts per task in the skill library.
        library_shots: demonstrations per library prompt (also the "32-shot" baseline).
        retrieval_shots: the ``k`` of the retrieval queries.
        retrieval_queries: queries per task and ``k``.
        retrieval_layers: the only layer set the retrieval choice may use; empty: every option of
            :func:`statelab.state.retrieval.layer_options` (single layers, adjacent pairs, middle third, all).
        retrieval_features: the features the retrieval choice may use (of ``raw``, ``unit``, ``centred``,
            ``whitened``).
        icl_shots: demonstrations in the per-item prompt (the "k-shot prompt" condition and the retrieval query).
        icl_items: test items per task.
        icl_prompts: distinct ``icl_shots``-shot prompts per task, each used for an equal share of the items.
        query_weight: weight of the query state when mixed with the retrieved soup (the soup gets the rest).
        skill_candidates: tasks tried by "likeliest skill, then the query": the best library entry of each of the
            top tasks by retrieval, and no skill; the one under which the query prompt's own tokens are likeliest
            starts the query.
        composition_source: ``"tasks"`` (long runs of demonstrations) or a UTF-8 text file (``.gz`` allowed).
        composition_sequences: sequences in the composition study.
        composition_chunks: chunks per sequence.
        composition_chunk_tokens: tokens per chunk.
        composition_continuation_tokens: tokens of the scored continuation.
        cross_pairs: pairs of related tasks for cross-task mixing (pairs naming absent tasks are skipped).
        cross_items: test items per task in the cross-task study.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: torch threads; 0 measures 1 against all cores on the model and takes the faster
            (:func:`pick_threads`).
        progress: show progress bars.
    """

    name: str = "soup"
    out_dir: str = "runs"
    model: str = "embedded"
    tokenizer: str = ""
    seed: int = 0
    tasks: tuple[str, ...] = ()
    max_tasks: int = 0
    template: str = ""
    library_sets: int = 4
    library_shots: int = 32
    retrieval_shots: tuple[int, ...] = (1, 2, 4, 8)
    retrieval_queries: int = 10
    retrieval_layers: tuple[int, ...] = ()
    retrieval_features: tuple[str, ...] = FEATURES
    icl_shots: int = 2
    icl_items: int = 20
    icl_prompts: int = 4
    query_weight: float = 0.5
    skill_candidates: int = 3
    composition_source: str = "tasks"
    composition_sequences: int = 16
    composition_chunks: int = 4
    composition_chunk_tokens: int = 96
    composition_continuation_tokens: int = 96
    cross_pairs: tuple[tuple[str, str], ...] = ()
    cross_items: int = 20
    device: str = "cpu"
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (
                self.library_sets >= 2,
                "library_sets must be >= 2 (the retrieval choice holds one set out at a time)",
                self.library_sets,
            ),
            (
                len(self.retrieval_features) > 0 and set(self.retrieval_features) <= set(FEATURES),
                f"retrieval_features must be some of {list(FEATURES)}",
                self.retrieval_features,
            ),
            (self.threads >= 0, "threads must be >= 0 (0: measured)", self.threads),
            (self.library_shots >= 1, "library_shots must be >= 1", self.library_shots),
            (
                len(self.retrieval_shots) > 0 and min(self.retrieval_shots) >= 1,
                "retrieval_shots must be >= 1",
                self.retrieval_shots,
            ),
            (self.retrieval_queries >= 1, "retrieval_queries must be >= 1", self.retrieval_queries),
            (self.icl_shots >= 1, "icl_shots must be >= 1", self.icl_shots),
            (self.icl_items >= 1, "icl_items must be >= 1", self.icl_items),
            (self.icl_prompts >= 1, "icl_prompts must be >= 1", self.icl_prompts),
            (0.0 <= self.query_weight <= 1.0, "query_weight must lie in [0, 1]", self.query_weight),
            (self.skill_candidates >= 1, "skill_candidates must be >= 1", self.skill_candidates),
            (self.composition_sequences >= 0, "composition_sequences must be >= 0", self.composition_sequences),
            (self.composition_chunks >= 1, "composition_chunks must be >= 1", self.composition_chunks),
            (
                self.composition_chunk_tokens >= 1,
                "composition_chunk_tokens must be >= 1",
                self.composition_chunk_tokens,
            ),
            (
                self.composition_continuation_tokens >= 2,
                "composition_continuation_tokens must be >= 2",
                self.composition_continuation_tokens,
            ),
            (self.max_tasks >= 0, "max_tasks must be >= 0", self.max_tasks),
            (self.device in ("cpu", "cuda", "auto"), "device must be 'cpu', 'cuda' or 'auto'", self.device),
            (
                self.template == "" or ("{x}" in self.template and "{y}" in self.template),
                "template must contain {x} and {y}",
                self.template,
            ),
            (bool(self.name) and "/" not in self.name, "name must be a plain directory name", self.name),
        ]
        for ok, msg, got in checks:
            if not ok:
                raise ConfigError(f"soup config: {msg}, got {got!r}")


def load_soup_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SoupConfig:
    """A :class:`SoupConfig` from a TOML/JSON file (or the defaults) and ``key=value`` overrides."""
    data = read_config_file(path) if path is not None else {}
    return from_dict(SoupConfig, apply_overrides(data, overrides))


@dataclass(frozen=True)
class TaskData:
    """One word-function task: its ``(input, answer)`` pairs in seeded order, train and test disjoint."""

    name: str
    train: tuple[tuple[str, str], ...]
    test: tuple[tuple[str, str], ...]
    library: tuple[tuple[tuple[str, str], ...], ...] = ()


def load_task_data(cfg: SoupConfig) -> list[TaskData]:
    """The word-function tasks of :mod:`statelab.tasks` that ``cfg`` names, and the user's own tasks.

    With ``cfg.tasks`` empty: every task with enough train items for the library's disjoint sets. An entry ending
    in ``.jsonl`` is a file of ``{"input", "output"}`` pairs (:func:`statelab.tasks.user.load_jsonl_task`; a
    relative path is read from the working directory), named after the file and split by key like the built-in
    tasks.
    """
    from statelab import tasks as suite
    from statelab.tasks.user import is_task_file, load_jsonl_task

    need = cfg.library_sets * cfg.library_shots
    user = {n: load_jsonl_task(n) for n in cfg.tasks if is_task_file(n)}
    if cfg.tasks:
        names = list(cfg.tasks)
        known = suite.word_task_names()
        unknown = [n for n in names if n not in known and n not in user]
        if unknown:
            raise ConfigError(
                f"soup config: unknown task(s) {unknown}; known: {', '.join(known)}, or a .jsonl file of "
                '{"input", "output"} pairs'
            )
        labels = [user[n].name if n in user else n for n in names]
        clash = sorted({x for x in labels if labels.count(x) > 1})
        if clash:
            raise ConfigError(f"soup config: two tasks are named {clash}; a task file is named after its file")
    else:
        names = [n for n in suite.word_task_names() if len(suite.get_word_task(n).pool("train")) >= need]
    if cfg.max_tasks:
        names = names[: cfg.max_tasks]
    out = []
    for name in names:
        task = user[name] if name in user else suite.get_word_task(name)
        library = task.disjoint_sets("train", cfg.library_sets, cfg.library_shots, seed=cfg.seed)
        out.append(
            TaskData(
                task.name,
                task.split("train", seed=cfg.seed),
                task.split("test", seed=cfg.seed),
                tuple(tuple(s) for s in library),
            )
        )
    if len(out) < 2:
        raise ConfigError(f"soup config: retrieval needs at least 2 tasks, got {[t.name for t in out]}")
    return out


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *keys])


def _pick(rng: np.random.Generator, pool: Sequence[Any], n: int, what: str) -> list[Any]:
    if n > len(pool):
        raise ConfigError(f"{what}: needs {n} examples but only {len(pool)} exist")
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


@dataclass
class SoupResults:
    """Everything measured, JSON-able (written to ``results.json``).

    ``retrieval_choice``: the chosen ``layers`` and ``feature`` and how they were validated; ``retrieval_options``:
    every option tried, ``{"layers", "feature", "validation", "test": {k: top-1}}`` (validation inside the
    library; test on the held-out queries, with the library statistics fitted on the whole library);
    ``retrieval_by_k``: the chosen option's test row (what ``store.search`` ranks with the recorded choice);
    ``layers_default``: the chosen layers.
    """

    model: str
    fingerprint: str
    tasks: list[str]
    layers_default: list[int]
    retrieval_choice: dict[str, Any] = field(default_factory=dict)
    retrieval_options: list[dict[str, Any]] = field(default_factory=list)
    retrieval_by_k: dict[str, float] = field(default_factory=dict)
    retrieval_by_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    icl: dict[str, dict[str, float]] = field(default_factory=dict)
    icl_mean: dict[str, float] = field(default_factory=dict)
    composition: dict[str, float] = field(default_factory=dict)
    composition_scored_tokens: int = 0
    cross: list[dict[str, Any]] = field(default_factory=list)
    threads: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class SoupRunner:
    """Runs the studies of one :class:`SoupConfig` on one model."""

    def __init__(self, cfg: SoupConfig, model: Any, tokenizer: Any, tasks: list[TaskData], template: str) -> None:
        self.cfg = cfg
        self.model = model
        self.tasks = tasks
        self.prompter = Prompter(template, tokenizer)
        self.device = model.device
        self.A = model.decay_A()
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.library: dict[str, list[State]] = {}
        self.store: Any = None
        self.choice: Any = None
        self.validation: tuple[list[State], list[str], list[int]] = ([], [], [])
        self.query_states: dict[tuple[str, int], list[State]] = {}
        self.results = SoupResults(
            model=cfg.model,
            fingerprint=model.fingerprint,
            tasks=[t.name for t in tasks],
            layers_default=[],
        )

    # -- primitives ----------------------------------------------------------------------------------------------
    def encode_many(self, texts: Sequence[str], progress: Any = None, bar: Any = None) -> list[State]:
        """The state after each text, from the zero state (batch 1 each), in length-bucketed ragged batches;
        advances ``bar`` once per text (in blocks of 64, so a long stage reports as it goes)."""
        from statelab.models.batching import encode_texts

        out: list[State] = []
        for start in range(0, len(texts), 64):
            block = texts[start : start + 64]
            out += encode_texts(self.model, self.prompter.tokenizer, block)
            if progress is not None:
                progress.advance(bar, len(block))
        return out

    @torch.no_grad()
    def encode_with_prefixes(
        self, texts: Sequence[str], prefixes: Sequence[Sequence[str]], progress: Any, bar: Any
    ) -> tuple[list[State], list[list[State]]]:
        """The state after each text and after each of its ``prefixes`` (texts the text starts with), from zero.

        When a prefix's tokens begin its text's tokens (always with a byte tokenizer), its state comes from the
        text's own pass (``model.encode(positions=...)``), so the prefixes cost nothing; otherwise they are
        encoded on their own. ``bar`` advances once per text and per prefix.
        """
        from statelab.models.batching import DEFAULT_BATCH_TOKENS, length_buckets, tokenize_texts

        tok = self.prompter.tokenizer
        rows = tokenize_texts(tok, texts)
        flat = [p for ps in prefixes for p in ps]
        pre = tokenize_texts(tok, flat) if flat else []
        it = iter(pre)
        pre_rows = [[next(it) for _ in ps] for ps in prefixes]
        aligned = all(
            len(p) <= len(r) and torch.equal(r[: len(p)], p) for r, ps in zip(rows, pre_rows, strict=True) for p in ps
        )
        if not aligned or len({len(ps) for ps in prefixes}) > 1:
            full = self.encode_many(texts, progress, bar)
            pre_states = self.encode_many(flat, progress, bar)
            it_states = iter(pre_states)
            return full, [[next(it_states) for _ in ps] for ps in prefixes]
        full_out: list[Any] = [None] * len(rows)
        pre_out: list[Any] = [None] * len(rows)
        for bucket in length_buckets([len(r) for r in rows], DEFAULT_BATCH_TOKENS):
            lengths = torch.tensor([len(rows[i]) for i in bucket])
            ids = torch.zeros(len(bucket), int(lengths.max()), dtype=torch.long)
            for j, i in enumerate(bucket):
                ids[j, : len(rows[i])] = rows[i]
            positions = [[len(p) for p in pre_rows[i]] + [len(rows[i])] for i in bucket]
            got = self.model.encode(ids.to(self.device), positions=positions, lengths=lengths)
            for j, i in enumerate(bucket):
                full_out[i] = got[-1].select([j])
                pre_out[i] = [g.select([j]) for g in got[:-1]]
            progress.advance(bar, len(bucket) * len(positions[0]))
        return full_out, pre_out

    @torch.no_grad()
    def encode_from(self, starts: Sequence[State], texts: Sequence[str]) -> list[State]:
        """The state after ``texts[i]`` read from ``starts[i]`` (one ragged batch; batch-1 states out)."""
        from statelab.models.batching import tokenize_texts

        rows = tokenize_texts(self.prompter.tokenizer, texts)
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        batch = self.model.encode(ids.to(self.device), state=State.cat(list(starts)), lengths=lengths)
        return [batch.select([i]) for i in range(len(rows))]

    @torch.no_grad()
    def likeliest_then(self, query: State, demos: Sequence[tuple[str, str]]) -> State:
        """The state after the query prompt ``demos`` (whose state from zero is ``query``) read from the start under
        which its own answers are likeliest: the best library entry of each of the top ``skill_candidates``
        retrieved tasks, or the zero state (no skill). Only the prompt's answer tokens (and their terminators) are
        scored, never a test item."""
        hits = self.store.search(query, k=min(len(self.store), 8 * self.cfg.skill_candidates))
        best_per_task: dict[str, str] = {}
        for h in hits:
            best_per_task.setdefault(h.task or "", h.name)
        chosen = list(best_per_task.items())[: self.cfg.skill_candidates]
        starts = [self.library[task][int(name.rsplit("/", 1)[1])] for task, name in chosen]
        starts.append(self.model.zero_state(1, device=self.device))
        ids, mask = self.prompter.demo_ids(demos)
        x = torch.tensor([ids], device=self.device).expand(len(starts), -1)
        out = self.model.score(x, State.cat(starts))
        scored = torch.tensor(mask[1:], dtype=torch.float64, device=out.logprobs.device)  # score() predicts x[1:]
        best = int((out.logprobs.double() * scored).sum(1).argmax())
        return out.state.select([best])

    def exact_match(self, state: State | None, items: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
        return exact_match(self.model, state, items)

    def top1(self, query: State, layers: Sequence[int] | None = None) -> tuple[str, str]:
        """``(entry name, task)`` of the best library match of ``query`` (``layers=None``: the store's recorded
        retrieval choice for this model)."""
        hits = self.store.search(query, k=1, layers=None if layers is None else list(layers))
        if not hits:
            raise StatelabError("the skill library returned no hit")
        return hits[0].name, hits[0].task or ""

    def _lib_rows(self) -> tuple[list[State], list[str], list[int]]:
        """The library's states, tasks and set indices, task by task."""
        rows = [(st, t.name, s) for t in self.tasks for s, st in enumerate(self.library[t.name])]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    # -- 1. library ----------------------------------------------------------------------------------------------
    def build_library(self, progress: Any) -> None:
        """Encode and store the library; also encode its validation queries: the first ``k`` demonstrations of
        every library prompt, for each ``k`` of the retrieval study below ``library_shots`` (train split only)."""
        from statelab.state.store import StateStore

        cfg = self.cfg
        lib_dir = self.run_dir / "library"
        if lib_dir.exists():
            shutil.rmtree(lib_dir)
        self.store = StateStore(lib_dir, layers=list(cfg.retrieval_layers) or None)
        sets = [(task.name, s, demos) for task in self.tasks for s, demos in enumerate(task.library)]
        texts = [self.prompter.demos(demos) for _, _, demos in sets]
        ks = [k for k in cfg.retrieval_shots if k < cfg.library_shots]
        bar = progress.add_task("skill library", total=len(texts) * (1 + len(ks)))
        states, prefix_states = self.encode_with_prefixes(
            texts, [[self.prompter.demos(demos[:k]) for k in ks] for _, _, demos in sets], progress, bar
        )
        self.store.add_many(
            [
                {"name": f"{name}/{s}", "state": state, "task": name, "tags": ("soup", "skill"), "prompt": text,
                 "shots": len(demos)}
                for (name, s, demos), text, state in zip(sets, texts, states, strict=True)
            ]
        )  # fmt: skip
        for (name, _, _), state in zip(sets, states, strict=True):
            self.library.setdefault(name, []).append(state)
        self.validation = (
            [st for sts in prefix_states for st in sts],
            [name for name, _, _ in sets for _ in ks],
            [s for _, s, _ in sets for _ in ks],
        )

    # -- 2. retrieval --------------------------------------------------------------------------------------------
    def choose_retrieval(self) -> None:
        """Choose layers and feature by leave-one-set-out validation inside the library (never the test queries)
        and record the choice in the store for this model."""
        from statelab.state.retrieval import choose, layer_options
        from statelab.state.search import resolve_layers

        cfg = self.cfg
        L = self.model.zero_state(1, device="meta").num_layers
        options = [tuple(resolve_layers(cfg.retrieval_layers, L))] if cfg.retrieval_layers else layer_options(L)
        lib, tasks, groups = self._lib_rows()
        v_states, v_tasks, v_groups = self.validation
        ks = [k for k in cfg.retrieval_shots if k < cfg.library_shots]
        how = (
            f"leave-one-set-out over the library's {cfg.library_sets} sets: the first k = {ks} demonstrations of "
            "each held-out library prompt against the other sets"
            if v_states
            else f"leave-one-set-out over the library's {cfg.library_sets} sets (library states as queries)"
        )
        self.choice = choose(
            lib, tasks, groups, v_states or None, v_tasks or None, v_groups or None,
            options=options, features=cfg.retrieval_features, method=how,
        )  # fmt: skip
        self.store.set_retrieval(self.choice)
        c = self.choice
        self.results.retrieval_choice = {"layers": list(c.layers), "feature": c.feature, "method": c.method}
        self.results.layers_default = list(c.layers)

    def retrieval(self, progress: Any) -> None:
        from statelab.state.retrieval import Kernels, per_layer, predict

        cfg = self.cfg
        self.choose_retrieval()
        n = len(self.tasks) * len(cfg.retrieval_shots) * cfg.retrieval_queries
        bar = progress.add_task("retrieval", total=n)
        queries = []  # (task, k, query text), every query drawn before any is encoded
        for ti, task in enumerate(self.tasks):
            for k in cfg.retrieval_shots:
                rng = _rng(cfg.seed, 2, ti, k)
                for _ in range(cfg.retrieval_queries):
                    demos = _pick(rng, task.test, k, f"query of task {task.name}")
                    queries.append((task, k, self.prompter.demos(demos)))
        states = self.encode_many([text for _, _, text in queries], progress, bar)
        for (task, k, _), q in zip(queries, states, strict=True):
            self.query_states.setdefault((task.name, k), []).append(q)
        # every option tried, with statistics fitted on the whole library: for the chosen one exactly what
        # store.search computes (the few-shot study below retrieves through the store)
        lib, tasks, _ = self._lib_rows()
        lib_x, q_x = per_layer(lib), per_layer(states)
        kernels = Kernels(lib_x, q_x)  # one pass over the features serves every option
        ks = [k for _, k, _ in queries]
        truth = [t.name for t, _, _ in queries]
        for row in self.choice.validation:
            got = predict(lib_x, tasks, q_x, row["layers"], row["feature"], kernels=kernels)
            test = {
                str(k): float(np.mean([g == t for g, t, kk in zip(got, truth, ks, strict=True) if kk == k]))
                for k in cfg.retrieval_shots
            }
            self.results.retrieval_options.append(
                {"layers": row["layers"], "feature": row["feature"], "validation": row["accuracy"], "test": test}
            )
            if (tuple(row["layers"]), row["feature"]) == (self.choice.layers, self.choice.feature):
                self.results.retrieval_by_k = test
        self.results.retrieval_by_layer = {
            str(o["layers"][0]): o["test"]
            for o in self.results.retrieval_options
            if o["feature"] == "raw" and len(o["layers"]) == 1
        }

    # -- 3. few-shot accuracy ------------------------------------------------------------------------------------
    def icl(self, progress: Any) -> None:
        from statelab.state.mix import mix

        cfg = self.cfg
        bar = progress.add_task("few-shot accuracy", total=len(self.tasks))
        per_prompt = ("k-shot prompt", "retrieved skill", "query + retrieved soup", "retrieved skill, then the query",
                      "retrieved soup, then the query", "likeliest skill, then the query",
                      "adecay(skill, query)")  # fmt: skip
        for ti, task in enumerate(self.tasks):
            rng = _rng(cfg.seed, 3, ti)
            test = _pick(rng, task.test, min(cfg.icl_items, len(task.test)), f"test items of {task.name}")
            items = [self.prompter.item(x, y) for x, y in test]
            acc: dict[str, list[bool]] = {m: [] for m in ICL_METHODS}
            acc["0-shot"] = self.exact_match(None, items)
            n_prompts = min(cfg.icl_prompts, len(items))
            groups = [items[p::n_prompts] for p in range(n_prompts)]  # each prompt serves an equal share of the items
            prompts = [_pick(rng, task.train, cfg.icl_shots, f"demonstrations of {task.name}") for _ in groups]
            many = _pick(rng, task.train, cfg.library_shots, f"{cfg.library_shots}-shot prompt of {task.name}")
            # every prompt of the task in one bulk encode: the k-shot prompts, the many-shot one, its one-shot parts
            texts = [self.prompter.demos(d) for d in prompts] + [self.prompter.demos(many)]
            states = self.encode_many(texts + [self.prompter.demos([ex]) for ex in many])
            queries, long_prompt, ones = states[: len(groups)], states[len(groups)], states[len(groups) + 1 :]
            skills, soups, mixed, composed = [], [], [], []
            for q in queries:
                hit_name, hit_task = self.top1(q)
                skill = self.library[hit_task][int(hit_name.rsplit("/", 1)[1])]
                soup = mix(self.library[hit_task], method="mean")
                skills.append(skill)
                soups.append(soup)
                mixed.append(mix([q, soup], method="mean", weights=[cfg.query_weight, 1.0 - cfg.query_weight]))
                composed.append(mix([skill, q], method="adecay", A=self.A))
            # ordered: the query prompt read from the retrieved state (exact, unlike a mix of separate states)
            after = self.encode_from(skills + soups, texts[: len(groups)] * 2)
            after_skill, after_soup = after[: len(groups)], after[len(groups) :]
            likeliest = [self.likeliest_then(q, d) for q, d in zip(queries, prompts, strict=True)]
            starts = dict(
                zip(per_prompt, (queries, skills, mixed, after_skill, after_soup, likeliest, composed), strict=True)
            )
            # one teacher-forced pass over every condition's items, each item from its own start state
            conditions = [(m, list(zip(sts, groups, strict=True))) for m, sts in starts.items()]
            conditions += [
                ("32-shot prompt", [(long_prompt, items)]),
                ("mean of one-shot states", [(mix(ones, method="mean"), items)]),
                ("norm-matched mean", [(mix(ones, method="norm_matched"), items)]),
            ]
            rows = [st.expand(len(its)) for _, pairs in conditions for st, its in pairs]
            hits = self.exact_match(State.cat(rows), [it for _, pairs in conditions for _, its in pairs for it in its])
            start = 0
            for m, pairs in conditions:
                n = sum(len(its) for _, its in pairs)
                acc[m] = hits[start : start + n]
                start += n
            self.results.icl[task.name] = {m: float(np.mean(v)) for m, v in acc.items()}
            progress.advance(bar)
        self.results.icl_mean = {
            m: float(np.mean([self.results.icl[t.name][m] for t in self.tasks])) for m in ICL_METHODS
        }

    # -- 4. ordered composition ----------------------------------------------------------------------------------
    def _composition_sequences(self) -> list[tuple[list[int], list[int]]]:
        """``(tokens, scored)`` per sequence: ``scored[t] = 1`` where token ``t`` counts in the perplexity.

        Task sequences score the answer tokens (and the terminator after each answer), the tokens a context can
        predict (and the only ones a model meta-trained on answers learned to predict); text scores every token.
        """
        cfg = self.cfg
        need = cfg.composition_chunks * cfg.composition_chunk_tokens + cfg.composition_continuation_tokens
        seqs = []
        p = self.prompter
        if cfg.composition_source == "tasks":
            for i in range(cfg.composition_sequences):
                rng = _rng(cfg.seed, 4, i)
                task = self.tasks[int(rng.integers(len(self.tasks)))]
                ids: list[int] = []
                mask: list[int] = []
                while len(ids) < need:
                    x, y = task.train[int(rng.integers(len(task.train)))]
                    q, a = p.item(x, y)
                    rest = p.ids(p.demos([(x, y)]))[len(q) + len(a) :]
                    ids += q + a + rest
                    mask += [0] * len(q) + [1] * len(a) + [0] * len(rest)
                seqs.append((ids[:need], mask[:need]))
            return seqs
        path = Path(cfg.composition_source)
        if not path.is_file():
            raise ConfigError(f"composition_source {cfg.composition_source!r} is neither 'tasks' nor a text file")
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        ids = p.ids(text)
        if len(ids) < need + 1:
            raise ConfigError(f"{path} has {len(ids)} tokens; a composition sequence needs {need}")
        for i in range(cfg.composition_sequences):
            start = int(_rng(cfg.seed, 4, i).integers(0, len(ids) - need))
            seqs.append((ids[start : start + need], [1] * need))
        return seqs

    @torch.no_grad()
    def composition(self, progress: Any) -> None:
        from statelab.state.mix import mix

        cfg = self.cfg
        seqs = self._composition_sequences()
        if not seqs:
            return
        n, c = cfg.composition_chunks, cfg.composition_chunk_tokens
        methods = ["full pass", "adecay", "adecay (conv context)", "mean", "last chunk", "no context"]
        nll_sum = dict.fromkeys(methods, 0.0)
        count = 0.0
        bar = progress.add_task("ordered composition", total=len(seqs))
        for ids, mask in seqs:
            x = torch.tensor(ids, dtype=torch.long, device=self.device)
            context, cont = x[: n * c], x[n * c :][None]
            scored = torch.tensor(mask[n * c + 1 :], dtype=torch.float64)  # score() predicts cont[1:]
            chunks = context.view(n, c)
            batch = self.model.encode(chunks)  # n chunks, each from zero, in one batched pass
            parts = [batch.select(i) for i in range(n)]
            # the previous chunk as conv context (zero SSM state): exact for a single layer (State Soup §2.4)
            tails = torch.cat([torch.zeros_like(chunks[:1]), chunks[:-1]])
            with_ctx = self.model.encode(chunks, conv_context=tails)
            with_ctx_parts = [parts[0]] + [with_ctx.select(i) for i in range(1, n)]
            states: dict[str, State | None] = {
                "full pass": self.model.encode(context[None]),
                "adecay": mix(parts, method="adecay", A=self.A),
                "adecay (conv context)": mix(with_ctx_parts, method="adecay", A=self.A),
                "mean": mix(parts, method="mean"),
                "last chunk": parts[-1],
                "no context": None,
            }
            for m, st in states.items():
                lp = self.model.score(cont, st).logprobs[0].double().cpu()
                nll_sum[m] -= float((lp * scored).sum())
            count += float(scored.sum())
            progress.advance(bar)
        if count == 0:
            raise ConfigError("the composition continuations hold no scored token; lengthen them")
        self.results.composition = {m: math.exp(v / count) for m, v in nll_sum.items()}
        self.results.composition_scored_tokens = int(count)

    # -- 5. cross-task mixing ------------------------------------------------------------------------------------
    def cross(self, progress: Any) -> None:
        from statelab.state.mix import mix

        cfg = self.cfg
        by_name = {t.name: (i, t) for i, t in enumerate(self.tasks)}
        pairs = [(a, b) for a, b in cfg.cross_pairs if a in by_name and b in by_name]
        if not pairs:
            return
        bar = progress.add_task("cross-task mixing", total=len(pairs))
        for a, b in pairs:
            items = {}
            for name in (a, b):
                ti, task = by_name[name]
                test = _pick(_rng(cfg.seed, 5, ti), task.test, min(cfg.cross_items, len(task.test)), name)
                items[name] = [self.prompter.item(x, y) for x, y in test]
            sa, sb = self.library[a][0], self.library[b][0]
            states = {
                f"{a} skill": sa,
                f"{b} skill": sb,
                "mean": mix([sa, sb], method="mean"),
                "norm-matched": mix([sa, sb], method="norm_matched"),
                "sum": mix([sa, sb], method="sum"),
            }
            rows = []
            for label, st in states.items():
                rows.append(
                    {
                        "state": label,
                        a: float(np.mean(self.exact_match(st, items[a]))),
                        b: float(np.mean(self.exact_match(st, items[b]))),
                    }
                )
            self.results.cross.append({"pair": [a, b], "rows": rows})
            progress.advance(bar)

    # -- all -----------------------------------------------------------------------------------------------------
    def run(self) -> SoupResults:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.run_dir.mkdir(parents=True, exist_ok=True)
        steps = [
            ("library", self.build_library),
            ("retrieval", self.retrieval),
            ("icl", self.icl),
            ("composition", self.composition),
            ("cross", self.cross),
        ]
        if not self.cfg.progress:
            progress: Any = LineProgress(enabled=False)
        elif Console().is_terminal:
            progress = Progress(
                TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
            )
        else:  # piped to a file: a live bar prints nothing until it stops, so print lines as the stages go
            progress = LineProgress()
        with progress:
            for name, fn in steps:
                t0 = time.perf_counter()
                fn(progress)
                self.results.seconds[name] = time.perf_counter() - t0
        return self.results


class LineProgress:
    """Progress as plain lines (for output piped to a file): a line when a stage starts, one at most every
    ``every`` seconds while it runs, and one when it is done, each with items per second. Same calls as
    ``rich.progress.Progress`` (``add_task``, ``advance``, ``update``, context manager)."""

    def __init__(self, every: float = 10.0, enabled: bool = True) -> None:
        self.every = every
        self.enabled = enabled
        self._tasks: list[dict[str, Any]] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def add_task(self, description: str, total: float) -> int:
        now = time.perf_counter()
        self._tasks.append({"name": description, "total": total, "done": 0, "t0": now, "last": now})
        self._say(f"{description}: {int(total)} to do")
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self._tasks[task_id]["done"] + advance)

    def update(self, task_id: int, completed: float | None = None, **_: Any) -> None:
        t = self._tasks[task_id]
        if completed is None or t["done"] >= t["total"]:
            return
        t["done"] = completed
        now = time.perf_counter()
        el = max(now - t["t0"], 1e-9)
        if t["done"] >= t["total"]:
            self._say(f"{t['name']}: {int(t['done'])}/{int(t['total'])} in {el:.1f} s ({t['done'] / el:.1f}/s)")
        elif now - t["last"] >= self.every:
            t["last"] = now
            self._say(f"{t['name']}: {int(t['done'])}/{int(t['total'])}, {el:.0f} s ({t['done'] / el:.1f}/s)")


def pick_threads(model: Any, candidates: Sequence[int] | None = None, tokens: int = 512) -> dict[str, Any]:
    """Measure torch thread counts on ``model`` and set the fastest; returns ``{"threads", "seconds": {n: s}}``.

    Each candidate (default: 1 and :func:`statelab.threads.available_cores`, the cores of the process's
    affinity mask less the machine's load, when that is more) encodes the same
    ``[8, tokens / 8]`` batch of random tokens after a warm-up, twice unless its first time is already 1.5x the
    best so far; its best time counts. On a machine whose cores are busy, extra threads wait on each other and
    small models run slower with them, so this measures rather than assumes (about a second for the embedded
    model).
    """
    from statelab.threads import available_cores

    cands = sorted(set(candidates or [1, available_cores()]))
    if len(cands) == 1:
        torch.set_num_threads(cands[0])
        return {"threads": cands[0], "seconds": {}}
    vocab = int(getattr(model, "vocab_size", 0) or 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, min(vocab, 256), (8, max(1, tokens // 8)), generator=g).to(model.device)
    before = torch.get_num_threads()
    seconds: dict[int, float] = {}
    try:
        with torch.no_grad():
            for n in cands:
                torch.set_num_threads(n)
                model.encode(x[:, :16])
                best = math.inf
                for _ in range(2):
                    t0 = time.perf_counter()
                    model.encode(x)
                    best = min(best, time.perf_counter() - t0)
                    if seconds and best > 1.5 * min(seconds.values()):
                        break
                seconds[n] = best
    finally:
        torch.set_num_threads(before)
    threads = min(seconds, key=lambda n: seconds[n])
    torch.set_num_threads(threads)
    return {"threads": threads, "seconds": {str(n): s for n, s in seconds.items()}}


def set_threads(cfg: SoupConfig, model: Any) -> dict[str, Any]:
    """Set torch's thread count for a run: ``cfg.threads``; when that is 0, ``STATELAB_THREADS`` if set, else for
    a model on the CPU the faster of 1 thread and the idle cores (:func:`pick_threads`; 1 without measuring when
    no core is idle). Returns ``{"threads", "seconds": {n: s}, "how"}``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return {"threads": cfg.threads, "seconds": {}, "how": "config"}
    if os.environ.get("STATELAB_THREADS", "").strip():
        from statelab.threads import apply_thread_rule

        return {"threads": apply_thread_rule(model, 0), "seconds": {}, "how": "STATELAB_THREADS"}
    if model.device.type == "cpu":
        from statelab.threads import available_cores

        cores = available_cores()  # read before any heavy work, so the load it sees is other processes'
        how = "measured" if cores > 1 else "no idle core to add (statelab.threads.available_cores)"
        return {**pick_threads(model, [1, cores]), "how": how}
    return {"threads": torch.get_num_threads(), "seconds": {}, "how": "default (model not on the CPU)"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _plots(runner: SoupRunner, res: SoupResults, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    cfg = runner.cfg
    ks = [int(k) for k in res.retrieval_by_k]
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, by_k in res.retrieval_by_layer.items():
        ax.plot(ks, [100 * by_k[str(k)] for k in ks], marker=".", lw=1, alpha=0.6, label=f"layer {layer}, raw")
    ax.plot(
        ks,
        [100 * res.retrieval_by_k[str(k)] for k in ks],
        marker="o",
        lw=2.5,
        color="black",
        label=f"chosen: layers {res.layers_default}, {res.retrieval_choice.get('feature', 'raw')}",
    )
    ax.axhline(100 / len(res.tasks), color="grey", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots in the query (k)")
    ax.set_ylabel("top-1 task retrieval accuracy (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Skill retrieval from k-shot query states")
    fig.tight_layout()
    fig.savefig(run_dir / "retrieval_vs_k.png", dpi=110)
    plt.close(fig)
    made.append("retrieval_vs_k.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    vals = [100 * res.icl_mean[m] for m in ICL_METHODS]
    labels = [
        m.replace("k-shot", f"{cfg.icl_shots}-shot").replace("32-shot", f"{cfg.library_shots}-shot")
        for m in ICL_METHODS
    ]
    bars = ax.bar(range(len(vals)), vals, color=plt.cm.tab10(np.arange(len(vals))))
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(vals)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"exact-match accuracy (%), mean over {len(res.tasks)} tasks")
    ax.set_ylim(0, 105)
    ax.set_title("Few-shot accuracy by state")
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_by_method.png", dpi=110)
    plt.close(fig)
    made.append("accuracy_by_method.png")

    feats, labels_t = [], []
    for t in res.tasks:
        for st in runner.library[t]:
            feats.append(st)
            labels_t.append(t)
    qk = 2 if 2 in cfg.retrieval_shots else cfg.retrieval_shots[0]
    qfeats, qlabels = [], []
    for t in res.tasks:
        for st in runner.query_states.get((t, qk), []):
            qfeats.append(st)
            qlabels.append(t)
    X = runner.choice.vectors(feats + qfeats).double()  # the chosen retrieval vectors (unit: cosine compares them)
    Xc = X - X[: len(feats)].mean(0)
    _, _, V = torch.linalg.svd(Xc[: len(feats)], full_matrices=False)
    P = (Xc @ V[:2].T).numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for i, t in enumerate(res.tasks):
        col, marker = cmap(i % 10), "o^sDvP"[(i // 10) % 6]  # colour and marker: 60 distinguishable tasks
        lib = [j for j, lt in enumerate(labels_t) if lt == t]
        qs = [len(feats) + j for j, lt in enumerate(qlabels) if lt == t]
        ax.scatter(P[lib, 0], P[lib, 1], color=col, marker=marker, s=45, label=t)
        ax.scatter(P[qs, 0], P[qs, 1], facecolors="none", edgecolors=[col], marker=marker, s=18, lw=0.8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    feature = res.retrieval_choice.get("feature", "raw")
    title = f"Library (filled), {qk}-shot queries (hollow): layers {res.layers_default}, {feature}, PCA"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(run_dir / "library_pca.png", dpi=110)
    plt.close(fig)
    made.append("library_pca.png")

    if res.composition:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(res.composition)
        bars = ax.barh(names, [res.composition[m] for m in names], color="tab:green")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xlabel("continuation perplexity (lower is better)")
        ax.invert_yaxis()
        ax.set_title("Ordered composition of independently encoded chunks")
        fig.tight_layout()
        fig.savefig(run_dir / "composition.png", dpi=110)
        plt.close(fig)
        made.append("composition.png")
    return made


def write_report(runner: SoupRunner, res: SoupResults, run_dir: Path) -> Path:
    """``report.md``, ``results.json``, ``config.json`` and the PNG plots in ``run_dir``."""
    cfg = runner.cfg
    plots = _plots(runner, res, run_dir)
    (run_dir / "results.json").write_text(json.dumps(res.__dict__, indent=1), encoding="utf-8")
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1), encoding="utf-8")
    k_lbl = f"{cfg.icl_shots}-shot"
    lines = [
        f"# State Soup report: {cfg.name}",
        "",
        f"Model `{cfg.model}` (fingerprint `{res.fingerprint[:16]}`), {len(res.tasks)} tasks, seed {cfg.seed}. "
        f"Config: `config.json`; raw numbers: `results.json`. Times (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res.seconds.items())
        + (f"; torch threads: {res.threads['threads']} ({res.threads['how']})" if res.threads else "")
        + ".",
        "",
        "## Skill library",
        "",
        f"{cfg.library_sets} disjoint {cfg.library_shots}-shot prompts per task (train split), encoded from the zero "
        f"state, stored in a StateStore ({len(res.tasks) * cfg.library_sets} entries).",
        "",
        "## Retrieval: top-1 task accuracy (%) from k-shot query states",
        "",
        f"Queries: {cfg.retrieval_queries} per task and k, from the test split. Chance: {100 / len(res.tasks):.1f}%. "
        f"Layers and feature are chosen by validation inside the library, never on these queries "
        f"({res.retrieval_choice.get('method', '')}); the choice, **layers {res.layers_default}, "
        f"{res.retrieval_choice.get('feature', 'raw')}**, is recorded in the store for this model, so "
        "`store.search` uses it (the few-shot study retrieves through it). Features: raw (the layers' SSM states "
        "concatenated), unit (each layer scaled to unit norm), centred (unit, minus the library mean), whitened "
        "(centred, the library's principal directions shrunk; `statelab.state.retrieval`). Cosine in every case.",
        "",
        "| layers | feature | validation | " + " | ".join(f"test k={k}" for k in res.retrieval_by_k) + " |",
        "|---|---|---|" + "---|" * len(res.retrieval_by_k),
        f"| **{res.layers_default}** | **{res.retrieval_choice.get('feature', 'raw')}** | **chosen** | "
        + " | ".join(f"**{_pct(v)}**" for v in res.retrieval_by_k.values())
        + " |",
    ]
    chosen = (res.layers_default, res.retrieval_choice.get("feature"))
    for o in res.retrieval_options:
        mark = " (chosen)" if (o["layers"], o["feature"]) == chosen else ""
        lines.append(
            f"| {o['layers']} | {o['feature']}{mark} | {_pct(o['validation'])} | "
            + " | ".join(_pct(v) for v in o["test"].values())
            + " |"
        )
    lines += ["", "![retrieval accuracy vs k](retrieval_vs_k.png)", "", "![library states, PCA](library_pca.png)", ""]
    heads = [m.replace("k-shot", k_lbl).replace("32-shot", f"{cfg.library_shots}-shot") for m in ICL_METHODS]
    lines += [
        "## Few-shot accuracy (%) by state",
        "",
        f"Greedy exact match of the answer and its terminator, {cfg.icl_items} test items per task. "
        f'"{k_lbl} prompt": {cfg.icl_prompts} prompts per task from the train split, each for an equal share '
        "of the items; each is also the retrieval query for "
        f'"retrieved skill" (the top-1 library state) and "query + retrieved soup" (weight {cfg.query_weight} '
        f'on the query, the rest on the mean of the retrieved task\'s library states). "..., then the query": '
        "the query prompt read from the retrieved skill's state, or from the soup's (ordered composition by "
        'running the model, exact); "likeliest skill, then the query": the same, from whichever of the top '
        f"{cfg.skill_candidates} retrieved tasks' best entries, or no skill, makes the query prompt's own tokens "
        'likeliest; "adecay(skill, query)": A-decay composition of the skill and the query '
        "prompt's own state, encoded apart. The one-shot states use the "
        f"same {cfg.library_shots} examples as the {cfg.library_shots}-shot prompt.",
        "",
        "| task | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
        "| **mean** | " + " | ".join(f"**{_pct(res.icl_mean[m])}**" for m in ICL_METHODS) + " |",
    ]
    for t in res.tasks:
        lines.append(f"| {t} | " + " | ".join(_pct(res.icl[t][m]) for m in ICL_METHODS) + " |")
    lines += ["", "![accuracy by method](accuracy_by_method.png)", ""]
    if res.composition:
        n, c = cfg.composition_chunks, cfg.composition_chunk_tokens
        lines += [
            "## Ordered composition: continuation perplexity",
            "",
            f"{cfg.composition_sequences} sequences from `{cfg.composition_source}`, {n} chunks of {c} tokens encoded "
            f"independently from zero, then a {cfg.composition_continuation_tokens}-token continuation scored from "
            f"the combined state ({res.composition_scored_tokens} scored tokens"
            + (": answer tokens and their terminators" if cfg.composition_source == "tasks" else "")
            + '). "adecay (conv context)" encodes each chunk with the previous chunk as conv context (zero SSM '
            "state); the other chunk states start from zero.",
            "",
            "| state | perplexity |",
            "|---|---|",
        ]
        lines += [f"| {m} | {v:.4f} |" for m, v in res.composition.items()]
        lines += ["", "![composition](composition.png)", ""]
    if res.cross:
        lines += ["## Cross-task mixing: accuracy (%) on each task of a pair", ""]
        for block in res.cross:
            a, b = block["pair"]
            lines += [f"**{a} + {b}** (first library state of each)", "", f"| state | {a} | {b} |", "|---|---|---|"]
            lines += [f"| {r['state']} | {_pct(r[a])} | {_pct(r[b])} |" for r in block["rows"]]
            lines.append("")
    if uses_demo_targets(cfg):
        lines += ["## Targets", ""] + [f"- {line}" for line in targets(res, cfg)] + [""]
    user_files = [t for t in cfg.tasks if t.lower().endswith(".jsonl")]
    if user_files:
        from statelab.tasks.user import task_file_digest

        lines += ["## Task files", ""]
        lines += [f"- `{f}`: sha256 `{task_file_digest(f)[:16]}`" for f in user_files] + [""]
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def uses_demo_targets(cfg: SoupConfig) -> bool:
    """True when the run is the demo the targets were set for: the embedded model on built-in tasks only. A run on
    a user's checkpoint or task files reports its figures without judging them against those targets."""
    return cfg.model == "embedded" and not cfg.tokenizer and not any(t.lower().endswith(".jsonl") for t in cfg.tasks)


def targets(res: SoupResults, cfg: SoupConfig) -> list[str]:
    """The demo's targets, each with the measured figures and whether it holds (demo runs only, see
    :func:`uses_demo_targets`)."""
    out = []
    if "2" in res.retrieval_by_k:
        v = res.retrieval_by_k["2"]
        line = f"retrieval top-1 at k=2 >= 90%: {_pct(v)}% ({'met' if v >= 0.9 else 'not met'})"
        if v < 0.9 and res.retrieval_options:
            best = max(res.retrieval_options, key=lambda o: o["test"].get("2", 0.0))
            line += (
                f"; the best option on these test queries, which the choice may not look at, reaches "
                f"{_pct(best['test']['2'])}% (layers {best['layers']}, {best['feature']}): a better choice of "
                "layers cannot reach the target where that is below it; the model's states must separate the tasks"
                if best["test"]["2"] < 0.9
                else f"; the best option on the test queries reaches {_pct(best['test']['2'])}% (layers "
                f"{best['layers']}, {best['feature']}), so validation inside the library did not find it"
            )
        out.append(line)
    if res.icl_mean:
        a, b = res.icl_mean["likeliest skill, then the query"], res.icl_mean["k-shot prompt"]
        ok = a >= b + 0.05
        line = (
            f"retrieved skill (likeliest of the top {cfg.skill_candidates}), then the query >= the "
            f"{cfg.icl_shots}-shot prompt alone + 5 points: "
            f"{_pct(a)}% vs {_pct(b)}% ({'met' if ok else 'not met'})"
        )
        if not ok:
            many = res.icl_mean["32-shot prompt"]
            line += (
                f"; the {cfg.library_shots}-shot prompt itself scores {_pct(many)}%, "
                f"{100 * (many - b):+.1f} points over the {cfg.icl_shots}-shot prompt: a retrieved "
                f"{cfg.library_shots}-shot skill adds at most about that much while the model gains so little from "
                "more demonstrations"
            )
        out.append(line)
        a, b = res.icl_mean["mean of one-shot states"], res.icl_mean["32-shot prompt"]
        ok = a >= b - 0.02
        out.append(
            f"mean of {cfg.library_shots} one-shot states within 2 points of the {cfg.library_shots}-shot prompt: "
            f"{_pct(a)}% vs {_pct(b)}% ({'met' if ok else 'not met'})"
        )
    if res.composition:
        c = res.composition
        ok = c["adecay"] < c["mean"] and c["adecay"] < c["last chunk"]
        out.append(
            f"adecay perplexity below mean and last chunk: {c['adecay']:.4f} vs {c['mean']:.4f} and "
            f"{c['last chunk']:.4f} ({'met' if ok else 'not met'})"
        )
    return out


def run_soup(cfg: SoupConfig, model: Any = None, tokenizer: Any = None) -> tuple[SoupResults, Path]:
    """Load the model (unless given), run every study, write the report; returns results and the report path.

    Torch's thread count is ``cfg.threads``; when that is 0: ``STATELAB_THREADS`` if set, else for a model on
    the CPU the faster of 1 thread and the idle cores (:func:`pick_threads`; 1 without measuring when no core is
    idle). The caller's count is restored on return.
    """
    before = torch.get_num_threads()
    try:
        if model is None:
            from statelab.models.loading import load_model

            use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
            model = load_model(cfg.model).to("cuda" if use_cuda else "cpu")
        model.eval()
        threads = set_threads(cfg, model)
        if cfg.progress:
            times = ", ".join(f"{n}: {s * 1000:.0f} ms" for n, s in threads["seconds"].items())
            print(f"torch threads: {threads['threads']} ({threads['how']}{'; ' + times if times else ''})", flush=True)
        if tokenizer is None:
            from statelab.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        from statelab import tasks as suite

        template = cfg.template or suite.DEFAULT_TEMPLATE
        runner = SoupRunner(cfg, model, tokenizer, load_task_data(cfg), template)
        runner.results.threads = threads
        res = runner.run()
        return res, write_report(runner, res, runner.run_dir)
    finally:
        torch.set_num_threads(before)


def print_summary(res: SoupResults, cfg: SoupConfig, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"State Soup: {cfg.model}, {len(res.tasks)} tasks")
    t.add_column("measure")
    t.add_column("value", justify="right")
    c = res.retrieval_choice
    t.add_row("retrieval choice (validated in the library)", f"layers {c.get('layers')}, {c.get('feature')}")
    for k, v in res.retrieval_by_k.items():
        t.add_row(f"retrieval top-1, k={k}", f"{_pct(v)}%")
    for m in ICL_METHODS:
        t.add_row(f"accuracy: {m}", f"{_pct(res.icl_mean[m])}%")
    for m, v in res.composition.items():
        t.add_row(f"perplexity: {m}", f"{v:.3f}")
    console.print(t)
    for line in targets(res, cfg) if uses_demo_targets(cfg) else ():
        console.print(f"  {line}")
    console.print(f"report: {report}")
