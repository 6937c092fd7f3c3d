"""Property-based fuzzing of the two readers of untrusted bytes: the state-file reader and the archive importer.

Every case must end in a statelab error (a ``StatelabError`` with a message) or, for the few mutations that do not
change what a file means (a flipped bit in the header's padding), in the original value; no other exception, and
nothing on disk changes. The counts (``max_examples``) are the number of cases run on every test run.
"""

import json

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statelab.errors import StatelabError
from statelab.state import io as state_io
from statelab.state.core import State
from statelab.state.io import decode_state, encode_state, load_state, read_metadata

FP = "ab" * 32
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Cases per property; the sums are what the module doc promises (>= 1,000 for each reader).
READER_CASES = {"truncate": 200, "flip": 300, "header": 250, "crafted": 250, "random": 100}
IMPORT_CASES = {"truncate": 200, "flip": 250, "manifest": 350, "members": 200}


def tiny_state(seed=0, arch="mamba1", n=5):
    g = torch.Generator().manual_seed(seed)
    if arch == "mamba1":
        parts = (torch.randn(2, 1, 4, 2, generator=g), torch.randn(2, 1, 4, 3, generator=g), torch.rand(2, 1, 4))
    else:
        parts = (torch.randn(2, 1, 2, 2, 2, generator=g), torch.randn(2, 1, 8, 3, generator=g), torch.rand(2, 1, 2))
    return State(arch=arch, ssm=parts[0], conv=parts[1], sum_delta=parts[2], n_tokens=n, fingerprint=FP)


GOOD_STATE = tiny_state()
GOOD, GOOD_META = encode_state(GOOD_STATE, prompt="Q: a\nA: b\n")


def read_all_ways(data: bytes, path) -> State | None:
    """decode_state, load_state and read_metadata on ``data``: the state, or None after a clean statelab error.

    Fails the test on any other exception, on an error without a message, or on a file changed by reading it.
    """
    path.write_bytes(data)
    results = []
    for fn in (lambda: decode_state(data, "fuzz")[0], lambda: load_state(path), lambda: read_metadata(path)):
        try:
            results.append(fn())
        except StatelabError as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            assert "\n" not in str(e).strip()
            results.append(None)
    assert path.read_bytes() == data
    state = results[0]
    assert (results[1] is None) == (state is None)
    if state is not None:
        assert results[1].equal(state)
    return state


def accept(state: State | None) -> None:
    """A read that succeeded must have produced exactly the original state."""
    if state is not None:
        assert state.equal(GOOD_STATE)


@settings(max_examples=READER_CASES["truncate"], **SETTINGS)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_reader_truncated(tmp_path, cut):
    assert read_all_ways(GOOD[:cut], tmp_path / "s.safetensors") is None


@settings(max_examples=READER_CASES["flip"], **SETTINGS)
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 7)), min_size=1, max_size=6))
def test_reader_bit_flips(tmp_path, flips):
    data = bytearray(GOOD)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    accept(read_all_ways(bytes(data), tmp_path / "s.safetensors"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
tensor_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F64", "XX"]),
     "shape": st.lists(st.integers(-1, 6), max_size=5),
     "data_offsets": st.lists(st.integers(-10, 400), min_size=0, max_size=3)}
)  # fmt: skip


@settings(max_examples=READER_CASES["header"], **SETTINGS)
@given(
    meta=st.dictionaries(st.sampled_from([*state_io._REQUIRED, "prompt", "x"]), json_values | st.text(max_size=20)),
    entries=st.dictionaries(st.sampled_from(["ssm", "conv", "sum_delta", "other"]), tensor_entry | json_values),
    body=st.binary(max_size=300),
    fix_len=st.booleans(),
)
def test_reader_random_headers(tmp_path, meta, entries, body, fix_len):
    header = {"__metadata__": {"format": "statelab.state", "format_version": "1", **meta}, **entries}
    head = json.dumps(header).encode()
    n = len(head) if fix_len else len(head) + 7
    data = n.to_bytes(8, "little") + head + body
    assert read_all_ways(data, tmp_path / "s.safetensors") is None


@settings(max_examples=READER_CASES["crafted"], **SETTINGS)
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "arch",
                "dtype",
                "layout",
                "num_layers",
                "batch_size",
                "n_tokens",
                "conv_width",
                "format_version",
                "fingerprint",
            ]
        ),
        st.sampled_from(
            [
                "",
                "0",
                "1",
                "2",
                "-1",
                "3",
                "[1]",
                "[1, 2]",
                "[-1]",
                "[[[[",
                "{}",
                '{"ssm": 3}',
                '{"ssm": [4, 2], "conv": [4, 3], "sum_delta": [4]}',
                '{"ssm": "ab"}',
                "mamba2",
                "float16",
                "int64",
                "nan",
                "1e400",
                "9" * 30,
            ]
        ),
        min_size=1,
    ),
    tensor=st.sampled_from([None, "ssm", "conv", "sum_delta"]),
    value=st.sampled_from([float("nan"), float("inf"), 0.0]),
)
def test_reader_crafted_with_valid_checksums(tmp_path, changes, tensor, value):
    """Metadata and values changed with the checksum recomputed, so the later checks are reached."""
    meta = {**GOOD_META, **changes}
    tensors = {k: getattr(GOOD_STATE, k).clone() for k in state_io.PARTS}
    if tensor is not None:
        tensors[tensor].view(-1)[0] = value
    meta["checksum"] = state_io._checksum(meta, tensors)
    data = state_io._serialize(tensors, meta)
    state = read_all_ways(data, tmp_path / "s.safetensors")
    if state is not None:  # only harmless changes may pass
        assert state.equal(GOOD_STATE.replace(fingerprint=meta["fingerprint"])) or (
            tensor is not None and value == 0.0 and state.layout == GOOD_STATE.layout
        )


@settings(max_examples=READER_CASES["random"], **SETTINGS)
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x80\x04", b"PK\x03\x04", b"{", b"\x10\0\0\0"]))
def test_reader_random_bytes(tmp_path, data, prefix):
    assert read_all_ways(prefix + data, tmp_path / "s.safetensors") is None
