"""The embedded model: the shipped artifacts load and match their recipe; the builder works end to end (tiny)."""

import json
from pathlib import Path

import torch

import statelab
from statelab.models.loading import embedded_dir
from statelab.train.config import load_train_config
from statelab.train.embedded import build_embedded, recipe_path


def test_shipped_embedded_model_matches_its_recipe():
    d = embedded_dir()
    cfg = load_train_config(recipe_path())
    model = statelab.load_model("embedded")
    assert model.arch == cfg.model.arch
    for key, value in cfg.model.config.items():
        if key not in ("vocab_size", "pad_vocab_size_multiple"):  # Hugging Face format stores the padded vocab
            assert getattr(model.config, key) == value, key
    assert model.embedding.num_embeddings >= cfg.model.config["vocab_size"]
    assert (d / "model.safetensors").stat().st_size <= 20 * 2**20
    tok = statelab.load_tokenizer("embedded")
    assert tok.encode("Q: cat\nA: ") == list(b"Q: cat\nA: ")
    card = (d / "README.md").read_text()
    assert "Accuracy by number of shots" in card and "training_curve.png" in card
    for f in ("training_curve.png", "accuracy_by_shots.png", "train_config.json", "accuracy_by_shots.json"):
        assert (d / f).is_file(), f
    assert json.loads((d / "train_config.json").read_text())["model"] == json.loads(json.dumps(cfg.model.__dict__))
    logits, state = model(torch.tensor([tok.encode("Q: one\nA: ")]))
    assert logits.shape[-1] >= 259 and state.n_tokens == 10


def test_shipped_embedded_files_match_their_checksums():
    """The files beside the model card are the ones the card describes (``SHA256SUMS`` written by the builder)."""
    import hashlib

    d = embedded_dir()
    lines = (d / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split("  ", 1)) for line in lines if line)
    assert {"config.json", "model.safetensors"} <= set(sums)
    for name, digest in sums.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name


def test_shipped_embedded_model_still_learns_in_context():
    """A regression guard on the shipped weights: greedy exact match on held-out items of a few tasks, 4 shots,
    far above the 0-shot guess and above floors set well under what the model card reports."""
    import numpy as np

    from statelab.tasks import DEFAULT_TEMPLATE
    from statelab.train.embedded import accuracy_by_shots

    model, tok = statelab.load_model("embedded"), statelab.load_tokenizer("embedded")
    tasks = ["uppercase", "first_letter", "reverse", "next_number"]
    acc = accuracy_by_shots(model, tok, tasks, DEFAULT_TEMPLATE, shots=(0, 4), items=8, prompts=2)
    four = float(np.mean([acc[t]["4"] for t in tasks]))
    assert four >= 0.75, acc
    assert four >= float(np.mean([acc[t]["0"] for t in tasks])) + 0.25, acc


def test_builder_trains_copies_evaluates_and_writes_a_card(tmp_path):
    dest = tmp_path / "embedded"
    card = build_embedded(
        [
            "model.config={ d_model = 16, n_layer = 2, vocab_size = 259, d_state = 4"
            + (", head_dim = 8 }" if load_train_config(recipe_path()).model.arch == "mamba2" else " }"),
            "data.seq_len=48",
            "data.options.tasks=['uppercase', 'first_letter']",
            "run.max_steps=2",
            "run.checkpoint_every=0",
            "run.progress=false",
            f"run.out_dir={json.dumps(str(tmp_path / 'run'))}",
        ],
        dest=dest,
    )
    assert card == dest / "README.md"
    acc = json.loads((dest / "accuracy_by_shots.json").read_text())
    assert set(acc) == {"uppercase", "first_letter"} and set(acc["uppercase"]) == {"0", "1", "2", "4", "8", "16", "32"}
    model = statelab.load_model(dest)
    assert model.config.d_model == 16 and model.config.n_layer == 2
    text = card.read_text()
    assert "| d_model | 16 |" in text and "`uppercase`, `first_letter`" in text
    # the card names the recipe's architecture and the Hugging Face class of the written config
    arch = load_train_config(recipe_path()).model.arch
    name, other = {"mamba1": ("Mamba-1", "Mamba-2"), "mamba2": ("Mamba-2", "Mamba-1")}[arch]
    hf_class = json.loads((dest / "config.json").read_text())["architectures"][0]
    assert f"byte-level {name} language model" in text and other not in text
    assert f"| architecture | {name} (`{arch}`) |" in text and f"Hugging Face `{hf_class}`" in text
    assert Path(dest / "training_curve.png").stat().st_size > 1000


def test_accuracy_by_shots_equals_scoring_each_prompt_alone():
    """The bulk evaluation (prompts encoded in ragged batches, every k scored in one pass) gives the accuracies of
    encoding each prompt alone and scoring its items on their own."""
    import numpy as np

    from statelab.eval.icl import Prompter, exact_match
    from statelab.tasks import DEFAULT_TEMPLATE, TASKS
    from statelab.train.embedded import accuracy_by_shots

    model, tok = statelab.load_model("embedded"), statelab.load_tokenizer("embedded")
    tasks, shots, items, prompts = ["uppercase", "first_letter"], (0, 1, 4), 8, 2
    got = accuracy_by_shots(model, tok, tasks, DEFAULT_TEMPLATE, shots=shots, items=items, prompts=prompts)
    p = Prompter(DEFAULT_TEMPLATE, tok)
    for ti, name in enumerate(tasks):
        its = [p.item(x, y) for x, y in TASKS[name].examples("test", items, seed=0)]
        for k in shots:
            hits = []
            for j in range(1 if k == 0 else prompts):
                demos = TASKS[name].examples("train", k, seed=17 * ti + 7919 * j + k)
                state = model.encode(torch.tensor([p.ids(p.demos(demos))])) if k else None
                hits += exact_match(model, state, its[j :: 1 if k == 0 else prompts])
            assert got[name][str(k)] == float(np.mean(hits)), (name, k)
    assert list(got["uppercase"]) == ["0", "1", "4"] and np.mean([v for r in got.values() for v in r.values()]) > 0
