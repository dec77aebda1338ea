"""Fixtures shared by several test files (plain helpers are in helpers.py)."""
import pytest


@pytest.fixture
def bnb_functional():
    """bitsandbytes.functional, the reference implementation, or skip when it is absent."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    return F


@pytest.fixture(scope="session")
def emulation():
    """The kernel's CPU emulation, built (once per session) from kernels/, or skip without a
    C++ compiler."""
    from minqlora.emulate import EmulationUnavailable, build_emulation
    try:
        return build_emulation()
    except EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def toy_base():
    """toy.pretrain(seed=0), built once for the toy, training and fine-tuning tests."""
    from minqlora import toy
    return toy.pretrain(seed=0)
