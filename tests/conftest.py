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


@pytest.fixture(scope="session")
def toy_base():
    """toy.pretrain(seed=0), built once for the toy, training and fine-tuning tests."""
    from minqlora import toy
    return toy.pretrain(seed=0)
