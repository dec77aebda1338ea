import pytest
import torch


@pytest.fixture
def bnb_functional():
    """bitsandbytes.functional, the reference implementation, or skip when it is absent."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    return F


def gaussian(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
