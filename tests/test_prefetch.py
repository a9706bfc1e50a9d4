"""The L2 prefetch kernel (``holdall.kernels.triton_prefetch``): it must run on every range it is given and
change nothing; refused inputs name the cause."""

from __future__ import annotations

import pytest
import torch

cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="Hopper's bulk L2 prefetch (sm_90) on the device machine")


@cuda_only
def test_prefetch_leaves_every_byte_as_it_was():
    from holdall.kernels.dispatch import prefetch_l2

    tensors = [torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
               for n in (3_000_000, 1000, 4, 123_456)]
    before = [t.clone() for t in tensors]
    prefetch_l2([(t, t.numel() * 4) for t in tensors])
    prefetch_l2([(tensors[0][16:], 10**9), (tensors[2], 0)])  # an offset view, more bytes than it has, none
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


@cuda_only
def test_prefetch_refuses_what_it_cannot_take():
    from holdall.kernels.dispatch import prefetch_l2

    t = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="16-byte aligned"):
        prefetch_l2([(t[1:], 16)])
    with pytest.raises(ValueError, match="at most 4"):
        prefetch_l2([(t, 16)] * 5)
    with pytest.raises(ValueError, match="16-byte aligned CUDA"):
        prefetch_l2([(torch.zeros(64, dtype=torch.uint8), 16)])
