"""RMSNorm and gated RMSNorm agree with transformers' Mamba norms (the layers checkpoints were trained with)."""

import pytest
import torch

from statelab.layers.norm import RMSNorm, rms_norm
from statelab.testing import assert_close


def test_rmsnorm_matches_transformers():
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 12, generator=g)
    ours, ref = RMSNorm(12, eps=1e-5), MambaRMSNorm(12, eps=1e-5)
    w = torch.randn(12, generator=g)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    assert_close("rmsnorm", ref(x), ours(x))


@pytest.mark.parametrize("groups", [1, 3])
def test_gated_rmsnorm_matches_transformers(groups):
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 4, 24, generator=g), torch.randn(2, 4, 24, generator=g)
    ours, ref = RMSNorm(24, eps=1e-6, group_size=24 // groups), MambaRMSNormGated(24, 24 // groups, eps=1e-6)
    w = torch.randn(24, generator=g)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    assert_close("gated", ref(x, z), ours(x, z))
    assert_close("ungated", ref(x), ours(x))
    # grouping matters: a per-group norm is not the whole-vector norm
    if groups > 1:
        assert not torch.allclose(RMSNorm(24, eps=1e-6)(x, z), ours(x, z) / w)


def test_gated_rmsnorm_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        RMSNorm(10, group_size=4)


def _outputs_and_grads(norm, x, w, gate=None):
    """The norm's output and the gradients of a fixed random projection of it with respect to x, w and gate."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    gate = None if gate is None else gate.clone().requires_grad_()
    y = norm(x, w, gate)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)).sum().backward()
    return [y.detach(), x.grad, w.grad] + ([] if gate is None else [gate.grad])


def _bit_equal(name, ref, got):
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: tensor {i} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("eps", [1e-5, None], ids=["eps1e-5", "eps-machine"])
def test_torch_style_is_torch_rmsnorm_bit_for_bit(dtype, eps):
    """style="torch" (the Birdie stacks, the GD-SSM baselines) gives torch.nn.RMSNorm's numbers exactly, forward
    and backward; eps=None is torch's default, the machine epsilon."""
    g = torch.Generator().manual_seed(2)
    x, w = (3 * torch.randn(3, 7, 40, generator=g)).to(dtype), torch.randn(40, generator=g).to(dtype)
    ref = _outputs_and_grads(lambda x, w, _: torch.nn.functional.rms_norm(x, (40,), w, eps), x, w)
    got = _outputs_and_grads(lambda x, w, _: rms_norm(x, w, eps, style="torch"), x, w)
    _bit_equal("torch style", ref, got)
    module = RMSNorm(40, eps, style="torch")
    assert list(module.state_dict()) == list(torch.nn.RMSNorm(40).state_dict()) and bool((module.weight == 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reward_model_norm_is_its_formula_bit_for_bit(dtype):
    """The Birdie reward model's norm (eps 1e-6, weights starting at 0.1) is ``x * rsqrt(mean(x²) + eps) * w`` in
    the input's dtype, as it was written before it used this module."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 9, 16, generator=g).to(dtype), (0.1 + 0.01 * torch.randn(16, generator=g)).to(dtype)
    ref = _outputs_and_grads(lambda x, w, _: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, x, w)
    got = _outputs_and_grads(lambda x, w, _: rms_norm(x, w, 1e-6, style="torch"), x, w)
    _bit_equal("reward model norm", ref, got)
    assert bool((RMSNorm(16, 1e-6, style="torch", init=0.1).weight == torch.tensor(0.1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mamba_style_is_transformers_norms_bit_for_bit(dtype):
    """The default style gives transformers' MambaRMSNorm and MambaRMSNormGated numbers exactly (the layers'
    checkpoints were trained with them); one group of all channels equals no grouping."""
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    g = torch.Generator().manual_seed(4)
    x, z = (3 * torch.randn(2, 5, 24, generator=g)).to(dtype), torch.randn(2, 5, 24, generator=g).to(dtype)
    w = torch.randn(24, generator=g)
    plain, gated = MambaRMSNorm(24, eps=1e-5), MambaRMSNormGated(24, 8, eps=1e-6)
    plain.weight.data.copy_(w)
    gated.weight.data.copy_(w)
    assert torch.equal(plain(x), rms_norm(x, w, 1e-5))
    assert torch.equal(gated(x, z), rms_norm(x, w, 1e-6, gate=z, group_size=8))
    assert torch.equal(rms_norm(x, w, 1e-6, gate=z, group_size=24), rms_norm(x, w, 1e-6, gate=z))


def test_bad_style_is_refused():
    with pytest.raises(ValueError, match="unknown style"):
        RMSNorm(8, style="fast")
