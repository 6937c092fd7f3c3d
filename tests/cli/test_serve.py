"""``statelab serve``: option errors are one line with exit code 2; the real command serves a checkpoint directory
and stops cleanly on SIGINT."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from statelab.cli import app
from statelab.cli.serve import parse_bytes
from statelab.models.mamba1 import Mamba1Config, Mamba1LM
from statelab.models.tokenizer import ByteTokenizer
from tests.serve._serving import reference

runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cache-bytes", "lots"], "--cache-bytes must be a size"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--block-tokens", "0"], "--block-tokens must be >= 1"),
        (["--max-tokens", "-1"], "--max-tokens must be >= 0"),
        (["--port", "70000"], "--port must lie in [0, 65535]"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--log-level", "loud"], "--log-level must be one of"),
    ],
    ids=["cache-bytes", "max-batch", "block-tokens", "max-tokens", "port", "threads", "log-level"],
)
def test_bad_options_exit_2_with_one_line(args, message):
    r = runner.invoke(app, ["serve", "--model", "embedded", *args])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [r.output.strip()] and message in r.output


def test_a_model_that_cannot_be_read_exits_1(tmp_path):
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


def test_parse_bytes():
    assert parse_bytes("0") == 0 and parse_bytes("512M") == 512 << 20 and parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("2048") == 2048 and parse_bytes("4kb") == 4096


def test_the_command_serves_a_checkpoint_directory(tmp_path):
    torch.manual_seed(0)
    model = Mamba1LM(Mamba1Config(d_model=16, n_layer=2, vocab_size=ByteTokenizer.vocab_size, d_state=4)).eval()
    ckpt = tmp_path / "tiny-mamba"
    model.save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    exe = Path(sys.executable).with_name("statelab")
    cmd = [str(exe), "serve", "--model", str(ckpt), "--port", "0", "--threads", "1", "-s", str(tmp_path / "store")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        for _ in range(200):  # the socket is bound before this line; wait for uvicorn to accept
            try:
                models = httpx.get(url + "/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert models["data"][0]["id"] == "tiny-mamba"
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0}, timeout=30)
        ids = ByteTokenizer().encode("hello")
        assert r.json()["choices"][0]["text"] == ByteTokenizer().decode(reference(model, ids, 8, 258))
        skills = httpx.post(url + "/v1/skills", json={"name": "greet", "prompt": "hello there"}, timeout=30)
        assert skills.status_code == 201
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
        rest = proc.stderr.read()
    assert rc == 0 and "Traceback" not in rest
