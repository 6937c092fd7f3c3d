"""RMSNorm and gated RMSNorm agree with transformers' Mamba norms (the layers checkpoints were trained with)."""

import pytest
import torch

from statelab.layers.norm import GatedRMSNorm, RMSNorm
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
    ours, ref = GatedRMSNorm(24, eps=1e-6, group_size=24 // groups), MambaRMSNormGated(24, 24 // groups, eps=1e-6)
    w = torch.randn(24, generator=g)
    ours.weight.data.copy_(w)
    ref.weight.data.copy_(w)
    assert_close("gated", ref(x, z), ours(x, z))
    assert_close("ungated", ref(x), ours(x))
    # grouping matters: a per-group norm is not the whole-vector norm
    if groups > 1:
        assert not torch.allclose(GatedRMSNorm(24, eps=1e-6)(x, z), ours(x, z) / w)


def test_gated_rmsnorm_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        GatedRMSNorm(10, group_size=4)
