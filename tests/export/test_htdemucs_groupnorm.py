"""`_AccurateGroupNorm` (the exported GroupNorm) against a float64 torch GroupNorm on groups large enough for its
staged-sum path, with random affine terms and several group counts: the export-parity tests reach that path only
with the fixtures' default norms (weight 1, bias 0) and one group. Issue 26 item 2 measured rewrites of this path
(and of the LayerScales around it) and kept none (docs/BENCHMARKS.md).
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from ripper_export.htdemucs import _AccurateGroupNorm
from ripper_export.onnx_export import sdr_db


@pytest.mark.parametrize("groups,affine,channel_last", [(1, True, False), (4, True, False), (2, False, False),
                                                         (1, True, True)])
def test_large_group_norm_equals_torch(groups, affine, channel_last):
    """Groups above _AccurateGroupNorm.SMALL take the staged-sum path."""
    torch.manual_seed(groups)
    channels, length = 8, 3 * _AccurateGroupNorm.SMALL // 2
    gn = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.copy_(torch.randn(channels))
            gn.bias.copy_(torch.randn(channels))
    acc = _AccurateGroupNorm(gn, channel_last=channel_last)
    assert channels * length // groups > acc.SMALL
    x = 3 + 2 * torch.randn(2, channels, length)
    with torch.no_grad():
        ref = copy.deepcopy(gn).double()(x.double())  # float64 reference
        out = acc(x.transpose(1, 2) if channel_last else x)
    if channel_last:
        out = out.transpose(1, 2)
    assert out.shape == ref.shape
    assert sdr_db(ref.numpy(), out.double().numpy()) > 110
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
