"""The one mixer protocol: every mixer takes its backend in the constructor (validated), refuses the keywords it
cannot honour, and the ones that take ``lengths`` stop each row's state at its own last real token."""

import pytest
import torch

from statelab.layers.attention import CausalSelfAttention
from statelab.layers.bidirectional import BidirectionalMamba2Mixer
from statelab.layers.gated_ssm import GatedSSMLayer
from statelab.layers.gd_ssm import GDSSM, GDSSMConfig, ProductTokenSSM
from statelab.layers.hawk import HawkLayer
from statelab.layers.linear_attention import LinearSelfAttention
from statelab.layers.mamba1 import Mamba1Mixer
from statelab.layers.mamba2 import Mamba2Mixer
from statelab.layers.protocol import Mixer, Segments
from statelab.layers.s5 import S5Layer
from statelab.testing import assert_close

BUILDERS = {
    "mamba1": lambda b=None: Mamba1Mixer(8, 16, 4, dt_rank=2, **({} if b is None else {"backend": b})),
    "mamba2": lambda b=None: Mamba2Mixer(8, 16, 4, 1, 8, backend=b),
    "split_mamba2": lambda b=None: BidirectionalMamba2Mixer(8, 16, 4, 1, 8, backend=b),
    "gated_ssm": lambda b=None: GatedSSMLayer(8, 6, True, **({} if b is None else {"backend": b})),
    "hawk": lambda b=None: HawkLayer(8, 6, bidirectional=True, **({} if b is None else {"backend": b})),
    "s5": lambda b=None: S5Layer(8, 4, **({} if b is None else {"backend": b})),
    "attention": lambda b=None: CausalSelfAttention(8, 2, **({} if b is None else {"backend": b})),
    "lsa": lambda b=None: LinearSelfAttention(8, 2, **({} if b is None else {"backend": b})),
    "gdssm": lambda b=None: GDSSM(GDSSMConfig(d=4), **({} if b is None else {"backend": b})),
    "product_token": lambda b=None: ProductTokenSSM(4, **({} if b is None else {"backend": b})),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_backend_is_validated_in_the_constructor_and_the_setter(name):
    layer = BUILDERS[name]()
    assert isinstance(layer, Mixer) and layer.backend == layer.BACKENDS[0]
    for b in layer.BACKENDS:
        assert BUILDERS[name](b).backend == b
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        BUILDERS[name]("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        layer.backend = "fast"
    assert layer.backend == layer.BACKENDS[0]


@pytest.mark.parametrize("name", ["s5", "attention", "lsa", "mamba1", "gated_ssm"])
def test_a_keyword_a_mixer_cannot_honour_is_refused(name):
    layer = BUILDERS[name]()
    x = torch.randn(1, 3, 8)
    refused = "segments" if name == "mamba1" else "positions"
    value = Segments(torch.zeros(1, 3, dtype=torch.bool)) if refused == "segments" else [1]
    with pytest.raises(ValueError, match=f"does not support {refused}="):
        layer(x, **{refused: value})


@pytest.mark.parametrize("name", ["mamba1", "mamba2", "split_mamba2", "gated_ssm", "hawk"])
def test_lengths_stop_each_row_at_its_last_real_token(name):
    layer = BUILDERS[name]()
    torch.manual_seed(1)
    x = torch.randn(2, 7, 8)
    _, st0 = layer(torch.randn(2, 3, 8))
    lengths = torch.tensor([7, 4])
    y, st = layer(x, st0, lengths=lengths)
    for b in range(2):
        if isinstance(st0, torch.Tensor):
            s0b = st0[b : b + 1]
        else:
            rows = [t[b : b + 1] if t is not None else None for t in st0]
            s0b = type(st0)(*rows) if hasattr(st0, "_fields") else tuple(rows)
        yb, sb = layer(x[b : b + 1, : lengths[b]], s0b)
        assert_close(f"row {b} y", yb[0], y[b, : lengths[b]], rtol=1e-4, atol=1e-5)
        got = [st] if isinstance(st, torch.Tensor) else [t for t in st if isinstance(t, torch.Tensor)]
        ref = [sb] if isinstance(sb, torch.Tensor) else [t for t in sb if isinstance(t, torch.Tensor)]
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            assert_close(f"row {b} state part {i}", r[0], g[b], rtol=1e-4, atol=1e-5)
