import json

import pytest
import torch
from typer.testing import CliRunner

from statelab.cli import app
from statelab.state.core import State
from statelab.state.io import load_state, save_state
from statelab.state.store import StateStore

FP = "ab" * 32
runner = CliRunner()


def task_state(task, seed, fp=FP):
    base = torch.randn(6, 1, 8, 4, generator=torch.Generator().manual_seed(100 + task))
    g = torch.Generator().manual_seed(seed)
    return State(
        arch="mamba1", ssm=base + 0.3 * torch.randn(6, 1, 8, 4, generator=g), conv=torch.randn(6, 1, 8, 3, generator=g),
        sum_delta=torch.rand(6, 1, 8, generator=g), n_tokens=12, fingerprint=fp,
    )  # fmt: skip


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def files(tmp_path):
    paths = {}
    for task in range(3):
        for seed in range(2):
            p = tmp_path / f"t{task}-{seed}.safetensors"
            save_state(task_state(task, 10 * task + seed), p, prompt=f"prompt {task}/{seed}")
            paths[(task, seed)] = p
    return paths


def test_add_list_show_get_rm(tmp_path, files):
    store = tmp_path / "store"
    for (task, seed), p in files.items():
        r = run("store", "add", p, "--name", f"t{task}-{seed}", "--task", f"t{task}", "--tag", "demo", "--shots", 4,
                "--store", store)  # fmt: skip
        assert r.exit_code == 0, r.output
    r = run("store", "list", "--store", store, "--task", "t1", "--json")
    assert r.exit_code == 0 and [e["name"] for e in json.loads(r.output)] == ["t1-0", "t1-1"]
    r = run("store", "list", "--store", store)
    assert r.exit_code == 0 and "t2-1" in r.output
    r = run("store", "show", "t0-1", "--store", store, "--json")
    shown = json.loads(r.output)
    assert shown["prompt"] == "prompt 0/1" and shown["shots"] == 4 and shown["tags"] == ["demo"]
    out = tmp_path / "out.safetensors"
    assert run("store", "get", "t0-1", out, "--store", store).exit_code == 0
    assert load_state(out).equal(task_state(0, 1))
    r = run("store", "rm", "t0-1", "t0-0", "--store", store, "--json")
    assert json.loads(r.output) == {"removed": ["t0-1", "t0-0"]}
    assert len(StateStore(store)) == 4


def test_search_check_export_import(tmp_path, files, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("STATELAB_STORE", str(store))
    for (task, seed), p in files.items():
        assert run("store", "add", p, "-n", f"t{task}-{seed}", "--task", f"t{task}").exit_code == 0
    query = tmp_path / "q.safetensors"
    save_state(task_state(2, 999), query)
    for index in ("exact", "sketch", "faiss", "usearch"):
        r = run("search", query, "-k", 2, "--index", index, "--json")
        assert r.exit_code == 0, r.output
        assert [h["task"] for h in json.loads(r.output)] == ["t2", "t2"]
    r = run("search", query, "-k", 2, "--layers", "0,1")
    assert r.exit_code == 0 and "t2-" in r.output
    r = run("search", query, "--threshold", 1.5)
    assert r.exit_code == 0 and "no match" in r.output
    r = run("store", "check", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    assert run("store", "export", tmp_path / "a.tar").exit_code == 0
    r = run("store", "import", tmp_path / "a.tar", "--store", tmp_path / "copy", "--json")
    assert r.exit_code == 0 and len(json.loads(r.output)["imported"]) == 6


def test_errors_are_one_line_and_exit_1(tmp_path, files):
    store = tmp_path / "store"
    p = files[(0, 0)]
    assert run("store", "add", p, "-n", "a", "-s", store).exit_code == 0
    cases = [
        (("store", "add", p, "-n", "a", "-s", store), "already has an entry named 'a'"),
        (("store", "add", tmp_path / "missing.safetensors", "-n", "b", "-s", store), "does not exist"),
        (("store", "show", "nope", "-s", store), "no entry named 'nope'"),
        (("search", p, "-s", tmp_path / "empty"), "is empty"),
        (("search", p, "-s", store, "--layers", "x"), "comma-separated integers"),
        (("search", p, "-s", store, "--index", "annoy"), "unknown index"),
        (("store", "import", tmp_path / "missing.tar", "-s", store), "cannot read archive"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.exit_code == 1, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
        assert "Traceback" not in r.output
    blob = next((store / "blobs").glob("*/*.safetensors"))
    blob.write_bytes(blob.read_bytes()[:-10])
    r = run("store", "check", "-s", store)
    assert r.exit_code == 1 and "PROBLEMS" in r.output
    r = run("store", "check", "--repair", "-s", store)
    assert r.exit_code == 0 and "dropped entries ['a']" in r.output


@pytest.mark.parametrize(
    "command", [("store", "add"), ("store", "list"), ("store", "show"), ("store", "get"), ("store", "rm"),
                ("store", "check"), ("store", "export"), ("store", "import"), ("search",)]
)  # fmt: skip
def test_every_help_has_an_example(command):
    r = run(*command, "--help")
    assert r.exit_code == 0 and "Example: statelab " + " ".join(command) in " ".join(r.output.split())
