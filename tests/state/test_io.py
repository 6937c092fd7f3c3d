import json
import os
import resource
import signal

import pytest
import torch
from safetensors.torch import save as st_save

from statelab.errors import StateFileError
from statelab.state import io
from statelab.state.core import State
from statelab.state.io import decode_state, encode_state, load_state, read_metadata, save_state


def make_state(arch="mamba1", B=1, L=3, dtype=torch.float32, seed=0, fp="ab" * 32, n=11):
    g = torch.Generator().manual_seed(seed)
    if arch == "mamba1":
        ssm = torch.randn(L, B, 8, 4, generator=g)
        conv = torch.randn(L, B, 8, 3, generator=g)
        sd = torch.rand(L, B, 8, generator=g)
    else:
        ssm = torch.randn(L, B, 2, 4, 4, generator=g)
        conv = torch.randn(L, B, 8 + 2 * 4, 3, generator=g)
        sd = torch.rand(L, B, 2, generator=g)
    return State(arch=arch, ssm=ssm.to(dtype), conv=conv.to(dtype), sum_delta=sd, n_tokens=n, fingerprint=fp)


def craft(tmp_path, state, meta_changes=None, tensor_changes=None, name="crafted.safetensors"):
    """A state file whose checksum is valid but whose metadata or tensors were changed on purpose."""
    _, meta = encode_state(state)
    meta = {**meta, **(meta_changes or {})}
    tensors = {k: getattr(state, k).contiguous() for k in io.PARTS}
    tensors.update(tensor_changes or {})
    meta["checksum"] = io._checksum(meta, tensors)
    path = tmp_path / name
    path.write_bytes(st_save(tensors, meta))
    return path


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_roundtrip_is_bit_exact(tmp_path, arch, dtype):
    s = make_state(arch, B=2, dtype=dtype)
    p = save_state(s, tmp_path / "s.safetensors")
    r = load_state(p)
    assert r.equal(s) and r.dtype == dtype and r.arch == arch
    assert r.sum_delta.dtype == torch.float32


def test_metadata_fields(tmp_path):
    s = make_state()
    p = save_state(
        s,
        tmp_path / "s.safetensors",
        prompt="Q: 1+1\nA: 2",
        token_ids=torch.tensor([5, 6, 7]),
        tokenizer_hash="tok123",
        extra={"shots": 4, "task": "sum"},
    )
    m = read_metadata(p)
    assert m["format"] == "statelab.state" and m["format_version"] == "1"
    assert m["arch"] == "mamba1" and m["fingerprint"] == "ab" * 32 and m["dtype"] == "float32"
    assert json.loads(m["layout"]) == {"ssm": [8, 4], "conv": [8, 3], "sum_delta": [8]}
    assert (m["num_layers"], m["batch_size"], m["n_tokens"], m["conv_width"]) == ("3", "1", "11", "3")
    assert m["prompt"] == "Q: 1+1\nA: 2" and json.loads(m["token_ids"]) == [5, 6, 7]
    assert m["tokenizer_hash"] == "tok123" and json.loads(m["extra"]) == {"shots": 4, "task": "sum"}
    assert m["checksum"].startswith("sha256:") and len(m["checksum"]) == 7 + 64


def test_bytes_are_deterministic_and_checksum_is_a_content_address():
    a, ma = encode_state(make_state(seed=1), prompt="x")
    b, mb = encode_state(make_state(seed=1), prompt="x")
    c, mc = encode_state(make_state(seed=2), prompt="x")
    assert a == b and ma["checksum"] == mb["checksum"]
    assert mc["checksum"] != ma["checksum"]
    _, md = encode_state(make_state(seed=1), prompt="y")
    assert md["checksum"] != ma["checksum"]


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path):
    p = tmp_path / "s.safetensors"
    save_state(make_state(seed=1), p)
    save_state(make_state(seed=2), p)
    assert load_state(p).equal(make_state(seed=2))
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_truncated_file_is_refused(tmp_path, cut):
    p = save_state(make_state(), tmp_path / "s.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(StateFileError, match="truncated"):
        load_state(p)


def test_trailing_garbage_is_refused(tmp_path):
    p = save_state(make_state(), tmp_path / "s.safetensors")
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(StateFileError, match="unexpected bytes"):
        load_state(p)


def test_every_flipped_bit_is_caught():
    data, _ = encode_state(make_state(L=2), prompt="hello")
    g = torch.Generator().manual_seed(0)
    header_end = 8 + int.from_bytes(data[:8], "little")
    positions = list(range(header_end)) + torch.randint(header_end, len(data), (200,), generator=g).tolist()
    for pos in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= bit
            with pytest.raises(StateFileError):
                decode_state(bytes(bad), f"flip@{pos}")


def test_flipped_data_byte_names_the_checksum(tmp_path):
    p = save_state(make_state(), tmp_path / "s.safetensors")
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum mismatch"):
        load_state(p)


def test_wrong_dtype_is_refused(tmp_path):
    s = make_state()
    p = craft(tmp_path, s, tensor_changes={"ssm": s.ssm.to(torch.bfloat16), "conv": s.conv.to(torch.bfloat16)})
    with pytest.raises(StateFileError, match="dtype bfloat16, metadata declares float32"):
        load_state(p)
    p = craft(tmp_path, s, tensor_changes={"sum_delta": s.sum_delta.double()})
    with pytest.raises(StateFileError, match="'sum_delta' has dtype float64"):
        load_state(p)
    p = craft(tmp_path, s, meta_changes={"dtype": "int8"})
    with pytest.raises(StateFileError, match="unsupported state dtype"):
        load_state(p)


def test_wrong_shape_is_refused(tmp_path):
    s = make_state()
    p = craft(tmp_path, s, tensor_changes={"ssm": s.ssm[:, :, :7].contiguous()})
    with pytest.raises(StateFileError, match="'ssm' has shape"):
        load_state(p)
    p = craft(tmp_path, s, meta_changes={"num_layers": "4"})
    with pytest.raises(StateFileError, match="metadata declares"):
        load_state(p)


def test_nan_state_is_refused_on_save_and_load(tmp_path):
    s = make_state()
    bad = s.replace(ssm=s.ssm.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    with pytest.raises(StateFileError, match="NaN/inf"):
        save_state(bad, tmp_path / "nan.safetensors")
    assert not list(tmp_path.iterdir())
    inf = s.replace(sum_delta=s.sum_delta.clone().fill_(float("inf")))
    with pytest.raises(StateFileError, match="'sum_delta' holds"):
        save_state(inf, tmp_path / "inf.safetensors")
    p = craft(tmp_path, s, tensor_changes={"conv": bad.ssm[..., :3].contiguous()})
    with pytest.raises(StateFileError, match="NaN/inf"):
        load_state(p)


def test_unknown_format_version_and_foreign_files_are_refused(tmp_path):
    p = craft(tmp_path, make_state(), meta_changes={"format_version": "2"})
    with pytest.raises(StateFileError, match="unknown state file format version '2'"):
        load_state(p)
    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(st_save({"w": torch.zeros(2)}))
    with pytest.raises(StateFileError, match="not a statelab state file"):
        load_state(foreign)
    with pytest.raises(StateFileError, match="does not exist"):
        load_state(tmp_path / "missing.safetensors")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(StateFileError, match="needs a statelab.State"):
        save_state({"ssm": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(StateFileError, match="does not exist"):
        save_state(make_state(), tmp_path / "no" / "x.safetensors")
    with pytest.raises(StateFileError, match="JSON-serialisable"):
        save_state(make_state(), tmp_path / "x.safetensors", extra={"t": torch.zeros(1)})
    assert not list(tmp_path.iterdir())


def test_load_to_device(tmp_path):
    p = save_state(make_state(), tmp_path / "s.safetensors")
    assert load_state(p, device="meta").device.type == "meta"


def test_write_failure_leaves_no_partial_file(tmp_path):
    """A real failed write: the file-size limit makes write() fail (EFBIG) halfway, in a forked child."""
    old = make_state(seed=3)
    target = save_state(old, tmp_path / "s.safetensors")
    before = target.read_bytes()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: limit file size to 2 KiB, then try to overwrite with a bigger state
        code = 3
        try:
            os.close(read_fd)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
            save_state(make_state(seed=4, L=32), target)
            code = 1
        except StateFileError as e:
            os.write(write_fd, str(e).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    msg = os.read(read_fd, 4096).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, msg
    assert "could not write" in msg and "nothing was written" in msg
    assert [f.name for f in tmp_path.iterdir()] == ["s.safetensors"]
    assert target.read_bytes() == before


def test_state_save_method_delegates(tmp_path):
    s = make_state()
    p = s.save(tmp_path / "m.safetensors", prompt="p")
    assert load_state(p).equal(s) and read_metadata(p)["prompt"] == "p"


def test_save_without_fsync_is_still_complete(tmp_path):
    s = make_state(seed=9)
    p = save_state(s, tmp_path / "n.safetensors", fsync=False)
    assert load_state(p).equal(s) and [f.name for f in tmp_path.iterdir()] == ["n.safetensors"]


# ---- with real models ------------------------------------------------------------------------------------------
def tiny_model(arch, seed=0):
    from statelab.models.mamba1 import Mamba1Config, Mamba1LM
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "mamba1":
            return Mamba1LM(Mamba1Config(d_model=16, n_layer=3, vocab_size=29, d_state=4)).eval()
        return Mamba2LM(Mamba2Config(vocab_size=29, d_model=12, n_layer=3, d_state=8, head_dim=6, n_groups=2)).eval()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_save_load_continue_gives_bit_identical_logits(tmp_path, arch):
    model = tiny_model(arch)
    ids = torch.randint(29, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model(ids[:, :17])
        p = save_state(state, tmp_path / "prefix.safetensors", token_ids=ids[0, :17])
        loaded = load_state(p, model)
        want, want_state = model(ids[:, 17:], state=state)
        got, got_state = model(ids[:, 17:], state=loaded)
    assert torch.equal(got, want) and got_state.equal(want_state)
    assert loaded.fingerprint == model.fingerprint and json.loads(read_metadata(p)["token_ids"]) == ids[0, :17].tolist()


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_model_with_one_changed_weight_is_refused(tmp_path, arch):
    import copy

    from statelab.errors import StateMismatchError

    model = tiny_model(arch)
    with torch.no_grad():
        _, state = model(torch.tensor([[1, 2, 3]]))
    p = save_state(state, tmp_path / "s.safetensors")
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(StateMismatchError) as err:
        load_state(p, other)
    assert model.fingerprint in str(err.value) and other.fingerprint in str(err.value)
    assert load_state(p, model).equal(state)


def test_a_state_of_another_layout_is_refused(tmp_path):
    from statelab.errors import StateMismatchError

    model = tiny_model("mamba1")
    p = save_state(make_state(fp=model.fingerprint, L=3), tmp_path / "s.safetensors")
    with pytest.raises(StateMismatchError, match="does not fit this model"):
        load_state(p, model)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ragged_batch_roundtrip_is_bit_exact(tmp_path, arch):
    """A file holds a batch with one token count per row; it loads back bit-exact with the same counts."""
    s = make_state(arch, B=3, n=0).replace(n_tokens=[5, 17, 1])
    path = save_state(s, tmp_path / "batch.safetensors")
    back = load_state(path)
    assert back.equal(s) and back.tokens == (5, 17, 1)
    assert json.loads(read_metadata(path)["n_tokens"]) == [5, 17, 1]
    assert back.select(1).n_tokens == 17
    # a uniform batch still writes a plain integer (files of earlier versions read the same way)
    u = make_state(arch, B=2, n=7)
    assert read_metadata(save_state(u, tmp_path / "u.safetensors"))["n_tokens"] == "7"


@pytest.mark.parametrize("bad", ['[1, "x", 3]', "[1, 2]", "[1, 2, -3]", "[1, 2", "[true, 1, 2]"])
def test_bad_per_row_counts_in_a_file_are_refused(tmp_path, bad):
    s = make_state(B=3)
    path = craft(tmp_path, s, meta_changes={"n_tokens": bad})
    with pytest.raises(StateFileError, match="n_tokens|counts|rows"):
        load_state(path)


@pytest.mark.parametrize(
    "kind, expected",
    [("pickle", "looks like a pickle"), ("torch.save", "looks like a zip archive (torch.save"),
     ("text", "looks like a text file"), ("random", "not a safetensors header length"),
     ("empty", "empty file")],
)  # fmt: skip
def test_files_that_are_not_state_files_are_named_as_such(tmp_path, kind, expected):
    """A pickle, a torch.save zip or a text file named .safetensors is not reported as a 'truncated' state file."""
    import pickle

    p = tmp_path / "x.safetensors"
    if kind == "torch.save":
        torch.save({"ssm": torch.zeros(3)}, p)
    else:
        data = {"pickle": pickle.dumps({"a": 1}), "text": b"Q: cat\nA: CAT\n" * 3, "empty": b""}
        p.write_bytes(data.get(kind, bytes(range(7, 207))))
    for read in (load_state, read_metadata):
        with pytest.raises(StateFileError, match="not a state file|empty file") as e:
            read(p)
        assert expected in str(e.value) and "truncated" not in str(e.value)
    if kind not in ("empty",):
        assert "never unpickles" in str(e.value)


def test_read_metadata_of_a_large_random_file_is_a_clean_error(tmp_path):
    """Its first 8 bytes read as a header length of ~1e19: no MemoryError/OverflowError, and nothing huge is read."""
    p = tmp_path / "r.safetensors"
    p.write_bytes(b"\xff" * 8 + os.urandom(5000))
    with pytest.raises(StateFileError, match="not a state file"):
        read_metadata(p)
    with pytest.raises(StateFileError, match="does not exist"):
        read_metadata(tmp_path / "missing.safetensors")


def test_truncated_real_state_file_is_still_called_truncated(tmp_path):
    data, _ = encode_state(make_state())
    p = tmp_path / "t.safetensors"
    for cut in (5, 40, len(data) - 3):
        p.write_bytes(data[:cut])
        with pytest.raises(StateFileError, match="truncated"):
            load_state(p)
