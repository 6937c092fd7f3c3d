"""Data streams: pure functions of (seed, index), and the same global batch whatever the process layout."""

import pytest
import torch

from statelab.errors import ConfigError
from statelab.train.config import DataSection
from statelab.train.data import IGNORE_INDEX, TextSource, build_source, step_rows
from statelab.train.mixture import TaskMixture, TaskMixtureOptions


@pytest.mark.parametrize("world, micro", [(1, 8), (1, 2), (2, 2), (4, 1), (2, 4)])
def test_step_rows_cover_the_global_batch_whatever_the_layout(world, micro):
    G = 8
    for step in (0, 3):
        rows = [
            r
            for m in range(G // (micro * world))
            for rank in range(world)
            for r in step_rows(step, m, rank, G, micro, world)
        ]
        assert sorted(rows) == list(range(step * G, step * G + G))


def test_text_source_is_a_pure_function_of_seed_and_index():
    src = TextSource(list(range(1000)), seq_len=16, seed=3)
    x, y = src.sequence(5)
    assert torch.equal(y[:-1], x[1:]) and x.shape == (16,)
    assert torch.equal(src.sequence(5)[0], TextSource(list(range(1000)), 16, 3).sequence(5)[0])
    assert not torch.equal(src.sequence(5)[0], TextSource(list(range(1000)), 16, 4).sequence(5)[0])
    with pytest.raises(ConfigError, match="needs 17"):
        TextSource(list(range(10)), seq_len=16, seed=0)


def test_unknown_source_and_bad_options():
    with pytest.raises(ConfigError, match="data.source='nope' is unknown"):
        build_source(DataSection(source="nope"))
    with pytest.raises(ConfigError, match="unknown config key.*data.options.colour"):
        build_source(DataSection(source="tasks", options={"colour": 1}))
    with pytest.raises(ConfigError, match="does not exist"):
        build_source(DataSection(source="text", options={"path": "/no/such/file.txt"}))


def test_task_mixture_sequences_are_demonstrations_with_loss_on_answers():
    from statelab.tasks import TASKS

    src = build_source(
        DataSection(source="tasks", seq_len=200, seed=1, options={"tasks": ["uppercase", "country_capital"]})
    )
    assert isinstance(src, TaskMixture)
    seen = set()
    for i in range(12):
        x, y = src.sequence(i)
        assert x.shape == y.shape == (200,)
        assert torch.equal(x, src.sequence(i)[0])  # deterministic
        task = TASKS[src.task_of(i)]
        seen.add(task.name)
        text = bytes(x.tolist()).decode("utf-8", errors="replace")
        blocks = text.split("\n\n")[:-1]  # the last demonstration may be cut
        train = set(task.pool("train"))
        for b in blocks:
            q, a = b.split("\nA: ")
            assert (q[len("Q: ") :], a) in train  # right answer, and never a test item
        # loss exactly on each answer and the newline after it
        scored = bytes(t for t in y.tolist() if t != IGNORE_INDEX).decode("utf-8", errors="replace")
        assert scored.startswith("".join(b.split("\nA: ")[1] + "\n" for b in blocks))
    assert seen == {"uppercase", "country_capital"}


def test_task_mixture_loss_on_all_tokens():
    src = TaskMixture(TaskMixtureOptions(tasks=("reverse",), loss_on="all"), seq_len=50, seed=0)
    x, y = src.sequence(0)
    assert (y != IGNORE_INDEX).all() and torch.equal(y[:-1], x[1:])
    with pytest.raises(ConfigError, match="loss_on"):
        TaskMixture(TaskMixtureOptions(loss_on="some"), seq_len=50, seed=0)
    with pytest.raises(ConfigError, match="unknown task"):
        TaskMixture(TaskMixtureOptions(tasks=("nope",)), seq_len=50, seed=0)


def _sha(src, n=50):
    import hashlib

    h = hashlib.sha256()
    for i in range(n):
        x, y = src.sequence(i)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()


def test_task_mixture_defaults_give_the_sequences_they_always_gave():
    """With the extra options off, sequence i is byte for byte what the mixture produced before they existed
    (checksums of the first 50 sequences recorded from that version)."""
    assert _sha(TaskMixture(TaskMixtureOptions(), 300, 3)) == (
        "b46fc16d899a03cd57556bab660820d1cb9062f6d594b78630ae41c88788bece"
    )
    assert _sha(TaskMixture(TaskMixtureOptions(tasks=("uppercase", "antonym", "reverse")), 300, 3)) == (
        "4ce120661f81da019843276b3fd9690070dfdcf6c6b896240c63b4d054c4826d"
    )


def _pairs(text, head, sep):
    """Complete ``(x, y)`` demonstrations of ``text`` rendered as ``head{x}...{y}sep`` (the last one may be cut)."""
    pre, mid = head.split("{x}")
    out = []
    for block in text.split(sep)[:-1]:
        if block.startswith(pre) and mid in block:
            x, y = block[len(pre) :].split(mid, 1)
            out.append((x, y))
    return out


def test_task_mixture_extra_templates_render_train_pairs_with_loss_on_the_answers():
    from statelab.tasks import TASKS

    extra = "Input: {x}\nOutput: {y}\n\n"
    src = TaskMixture(TaskMixtureOptions(tasks=("uppercase",), templates=(extra,), template_mix=1.0), 160, 0)
    train = set(TASKS["uppercase"].pool("train"))
    for i in range(6):
        x, y = src.sequence(i)
        text = bytes(x.tolist()).decode()
        assert text.startswith("Input: ") and "Q: " not in text
        pairs = _pairs(text, "Input: {x}\nOutput: ", "\n\n")
        assert pairs and all(p in train for p in pairs)
        scored = bytes(t for t in y.tolist() if t != IGNORE_INDEX).decode()
        assert scored.startswith("".join(a + "\n" for _, a in pairs))
    half = TaskMixture(TaskMixtureOptions(tasks=("uppercase",), templates=(extra,), template_mix=0.5), 60, 0)
    starts = {bytes(half.sequence(i)[0][:3].tolist()) for i in range(40)}
    assert starts == {b"Q: ", b"Inp"}


def test_task_mixture_switches_tasks_inside_a_sequence():
    from statelab.tasks import TASKS

    names = ("uppercase", "reverse", "word_length")
    src = TaskMixture(TaskMixtureOptions(tasks=names, switch_prob=1.0), 400, 0)
    n_tasks = []
    for i in range(10):
        text = bytes(src.sequence(i)[0].tolist()).decode()
        pairs = _pairs(text, "Q: {x}\nA: ", "\n\n")
        seq = []
        for x, y in pairs:
            fits = [n for n in names if TASKS[n](x) == y and (x, y) in set(TASKS[n].pool("train"))]
            assert fits, (x, y)
            seq.append(fits[0])
        changes = sum(a != b for a, b in zip(seq, seq[1:], strict=False))
        n_tasks.append(changes + 1)
    assert min(n_tasks) >= 2 and max(n_tasks) <= 3


def test_task_mixture_text_windows_are_the_packaged_text_with_loss_everywhere():
    from statelab.train.mixture import _load_text

    corpus = _load_text("tinyshakespeare")
    src = TaskMixture(TaskMixtureOptions(tasks=("uppercase",), text_fraction=1.0), 120, 0)
    for i in range(4):
        x, y = src.sequence(i)
        assert (y != IGNORE_INDEX).all() and torch.equal(y[:-1], x[1:])
        assert bytes(x.tolist()).decode("utf-8", errors="ignore")[5:-5] in corpus
    mixed = TaskMixture(TaskMixtureOptions(tasks=("uppercase",), text_fraction=0.3), 120, 0)
    text_rows = sum(bool((mixed.sequence(i)[1] != IGNORE_INDEX).all()) for i in range(100))
    assert 15 <= text_rows <= 45


def test_task_mixture_bad_extra_options(tmp_path):
    with pytest.raises(ConfigError, match="needs data.options.templates"):
        TaskMixture(TaskMixtureOptions(template_mix=0.5), 50, 0)
    with pytest.raises(ConfigError, match="switch_prob must be a probability"):
        TaskMixture(TaskMixtureOptions(switch_prob=1.5), 50, 0)
    with pytest.raises(ConfigError, match="exactly one"):
        TaskMixture(TaskMixtureOptions(templates=("{x} {x} {y}",), template_mix=0.5), 50, 0)
    with pytest.raises(ConfigError, match="neither 'tinyshakespeare' nor an existing"):
        TaskMixture(TaskMixtureOptions(text_fraction=0.1, text=str(tmp_path / "none.txt")), 50, 0)
