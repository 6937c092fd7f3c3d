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
