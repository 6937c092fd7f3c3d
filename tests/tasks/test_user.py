"""A user's JSONL task: pairs read and checked line by line, split by key exactly as the built-in tasks."""

import json

import pytest

from statelab.errors import ConfigError
from statelab.tasks.base import split_of
from statelab.tasks.user import is_task_file, load_jsonl_task, task_file_digest


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_pairs_and_the_split_by_key(tmp_path):
    words = [f"w{i}" for i in range(60)]
    rows = [{"input": w, "output": w.upper()} for w in words] + [{"input": "x1", "output": "X", "key": "w3"}]
    t = load_jsonl_task(_write(tmp_path / "up.jsonl", ["", *rows, "", rows[0]]))  # blank lines, a repeated pair
    assert t.name == "up" and t.group == "user" and t("w7") == "W7"
    train, test = t.pool("train"), t.pool("test")
    assert len(train) + len(test) == 61 and test and train
    for x, _ in train:
        assert split_of("w3" if x == "x1" else x) == "train"
    for x, _ in test:
        assert split_of("w3" if x == "x1" else x) == "test"
    # the split follows the key: x1 goes wherever w3 goes; the order of lines does not matter
    assert (("x1", "X") in test) == (("w3", "W3") in test)
    shuffled = load_jsonl_task(_write(tmp_path / "up2.jsonl", rows[::-1]))
    assert set(shuffled.pool("test")) == set(test)
    assert load_jsonl_task(tmp_path / "up.jsonl", name="mine").name == "mine"
    assert is_task_file("a/B.JSONL") and not is_task_file("uppercase")
    assert len(task_file_digest(tmp_path / "up.jsonl")) == 64


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"input": "a", "output": "A"}', '{"input": "b", "output": '], ":2: invalid JSON"),
        ([["a", "A"]], ":1: a pair is a JSON object"),
        ([{"input": "a"}], ":1: 'output' must be a non-empty string"),
        ([{"input": "", "output": "A"}], "'input' must be a non-empty string"),
        ([{"input": "a", "output": 1}], "'output' must be a non-empty string"),
        ([{"input": "a", "output": "A", "label": "x"}], "unknown key(s) ['label']"),
        ([{"input": "a", "output": "A", "key": 3}], "'key' must be a non-empty string"),
        ([{"input": "a", "output": "A"}, {"input": "a", "output": "B"}], ":2: input 'a' has output 'B' here"),
        (["", "  "], "has no pairs"),
    ],
)
def test_bad_lines_are_named(tmp_path, rows, message):
    with pytest.raises(ConfigError) as e:
        load_jsonl_task(_write(tmp_path / "t.jsonl", rows))
    assert message in str(e.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl_task(tmp_path / "none.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_jsonl_task(tmp_path / "bin.jsonl")
