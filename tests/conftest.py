"""Fixtures shared by several test files (plain helpers are in helpers.py)."""
import pytest
import torch

from minqlora.bench.references import import_bitsandbytes

import_bitsandbytes()     # offline and quiet, before any test imports it (bench/references.py)


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
    from minqlora.emulate import EmulationUnavailable
    from minqlora.emulate import build_emulation
    try:
        return build_emulation()
    except EmulationUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def decoder():
    """The CPU decoder of backend "cpp" (kernels/dequant_cpu.cpp), built once per session, or
    skip without a C++ compiler."""
    from minqlora.cpu_decode import CppDecoderUnavailable, build_decoder
    try:
        return build_decoder()
    except CppDecoderUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory, request):
    """toy.pretrain(seed=0), built once for the toy, training and fine-tuning tests. Under
    pytest-xdist the first worker to ask trains it and saves its state_dict in the run's shared
    temporary folder; the others load it (pretraining is deterministic on a machine: same bits)."""
    from minqlora import toy
    if not hasattr(request.config, "workerinput"):              # no xdist: one process
        return toy.pretrain(seed=0)
    from filelock import FileLock
    path = tmp_path_factory.getbasetemp().parent / "toy_base.pt"    # this run's, all workers'
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            torch.save(toy.pretrain(seed=0).state_dict(), path)
        model = toy.ToyLM()
        model.load_state_dict(torch.load(path))
    return model.eval()
