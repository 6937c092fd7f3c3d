"""Backends: the capability check, clear refusals on CPU, and (on a GPU) the fla kernel against the naive loop."""

import pytest
import torch

from statelab.backends import available_backends, cuda_backend_problem, ssd_scan_cuda
from statelab.ops.ssd import ssd_scan, ssd_scan_naive
from statelab.testing import assert_close
from tests.ops.test_ssd import NAMES, make_inputs, run_with_grads


def test_pure_backends_always_available():
    got = available_backends()
    assert got[:2] == ("naive", "chunk")
    assert ("cuda" in got) == (cuda_backend_problem() is None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_backend_refuses_clearly_without_a_gpu():
    assert "CUDA" in cuda_backend_problem()
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: no CUDA device"):
        ssd_scan(*make_inputs(T=5), backend="cuda")


def _needs_kernel():
    problem = cuda_backend_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 500], ids=lambda t: f"T{t}")
def test_cuda_kernel_equals_naive(T, dtype):
    _needs_kernel()
    inputs = make_inputs(T=T, dtype=dtype, P=16, N=32)
    positions = sorted({1, (T + 1) // 2, T})
    # forward through the kernel (no gradients asked for)
    with torch.no_grad():
        ref = ssd_scan_naive(*inputs, output_final_state=True, return_states_at=positions)
        got = ssd_scan_cuda(*(t.cuda() for t in inputs), output_final_state=True, return_states_at=positions)
    # the kernel's fp32 products run on tensor cores in tf32 (10-bit mantissa): 1e-2, not 1e-5
    rtol, atol = (1e-2, 1e-2) if dtype == torch.float32 else (5e-2, 5e-2)
    assert_close("kernel y", ref.y, got.y.cpu(), rtol=rtol, atol=atol)
    assert_close("kernel final_state", ref.final_state, got.final_state.cpu(), rtol=rtol, atol=atol)
    for p, r, c in zip(positions, ref.states_at.unbind(1), got.states_at.unbind(1), strict=True):
        assert_close(f"kernel state after {p}", r, c.cpu(), rtol=rtol, atol=atol)
    # with gradients: the kernel's backward, or the chunked path where that backward is unusable
    ref, ref_grads = run_with_grads(ssd_scan_naive, inputs, positions)
    got, got_grads = run_with_grads(ssd_scan_cuda, inputs, positions, "cuda")
    assert_close("y", ref.y, got.y, rtol=rtol, atol=atol)
    assert_close("final_state", ref.final_state, got.final_state, rtol=rtol, atol=atol)
    assert_close("sum_delta", ref.sum_delta, got.sum_delta)
    for p, r, c in zip(positions, ref.states_at.unbind(1), got.states_at.unbind(1), strict=True):
        assert_close(f"state after {p}", r, c, rtol=rtol, atol=atol)
    for name, r, c in zip(NAMES, ref_grads, got_grads, strict=True):
        scale = max(1.0, float(r.abs().max()))
        assert_close(f"d{name}", r, c, rtol=rtol * 5, atol=atol * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunk", "cuda"])
def test_model_on_gpu_matches_cpu_and_continues(backend):
    if backend == "cuda":
        _needs_kernel()
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=50, d_model=32, n_layer=2, d_state=16, head_dim=16, n_groups=2)
    cpu = Mamba2LM(cfg).eval()
    gpu = Mamba2LM(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    gpu.backend = backend
    x = torch.randint(0, 50, (2, 150), generator=torch.Generator().manual_seed(1))
    tol = dict(rtol=1e-2, atol=1e-2) if backend == "cuda" else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref, s_ref = cpu(x)
        got, s_got = gpu(x.cuda())
        assert_close("logits", ref, got.cpu(), **tol)
        assert_close("ssm", s_ref.ssm, s_got.ssm.cpu(), **tol)
        l1, s1 = gpu(x[:, :70].cuda())
        l2, s2 = gpu(x[:, 70:].cuda(), s1)
        assert_close("prefix+suffix", got, torch.cat([l1, l2], 1), **tol)
        toks, _, _ = gpu.generate(x[:, :10].cuda(), max_new_tokens=5)
        want, _, _ = cpu.generate(x[:, :10], max_new_tokens=5)
        assert torch.equal(toks.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunk", "cuda"])
def test_ragged_batch_on_gpu_equals_rows_alone(backend):
    """Right and left padding on the GPU: each row's state and real-position logits equal the row alone."""
    if backend == "cuda":
        _needs_kernel()
    from statelab.models.mamba2 import Mamba2Config, Mamba2LM

    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=50, d_model=32, n_layer=2, d_state=16, head_dim=16, n_groups=2)
    m = Mamba2LM(cfg).eval().to("cuda")
    m.backend = backend
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 50, (n,), generator=g).cuda() for n in (1, 3, 64, 65, 130)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    tol = dict(rtol=1e-2, atol=1e-2) if backend == "cuda" else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits, state = m(ids, attention_mask=mask)
        for b, r in enumerate(rows):
            alone, sa = m(r[None])
            assert_close(f"row {b} logits", alone[0], logits[b, T - len(r) :], **tol)
            assert_close(f"row {b} ssm", sa.ssm, state.select(b).ssm, **tol)
            assert_close(f"row {b} conv", sa.conv, state.select(b).conv, **tol)
        assert state.tokens == tuple(len(r) for r in rows)
