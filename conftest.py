"""pytest set-up for the whole repository (tests/ and lessons/): nbval's notebook kernels talk
to pytest over unix sockets instead of TCP ports.

Over TCP, the client picks free ports and the kernel then binds them. Two pytest-xdist workers
that start kernels at the same moment can pick the same port; the loser's kernel exits at once,
and nbval then waits for it forever (seen once in CI: a worker stuck in kernel_info). Unix
socket paths are unique per kernel (a fresh private folder each), so that race cannot happen.

It also gives each pytest run a fresh, private inductor cache (TORCHINDUCTOR_CACHE_DIR), which
the notebook kernels and pytest-xdist's workers inherit. Inductor's default cache folder is shared
by every run on a machine, under a key that leaves out ATEN_CPU_CAPABILITY: code compiled on one
kernel path was reused by .ci/run's rerun on another and returned garbage (values of 1e38, NaN).

Fixtures shared by the test files live in tests/conftest.py.
"""
import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

if not os.environ.get("MINQLORA_TEST_INDUCTOR_CACHE"):      # the first pytest process of a run
    _cache = tempfile.mkdtemp(prefix="inductor-")            # 0700, unique to this run
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["MINQLORA_TEST_INDUCTOR_CACHE"] = _cache

try:
    import nbval.kernel
except ImportError:                        # nbval absent: no notebooks to run
    nbval = None

if nbval is not None:
    class _UnixSocketKernelManager(nbval.kernel.KernelManager):
        """jupyter_client's KernelManager with transport "ipc" at an absolute, private path
        (a relative one would resolve differently in the kernel, which runs in lessons/)."""

        folder = None

        def __init__(self, **kwargs):
            if _UnixSocketKernelManager.folder is None:      # one 0700 folder per process
                _UnixSocketKernelManager.folder = Path(tempfile.mkdtemp(prefix="nbval-"))
                atexit.register(shutil.rmtree, _UnixSocketKernelManager.folder, True)
            ip = str(_UnixSocketKernelManager.folder / uuid.uuid4().hex[:12])
            super().__init__(transport="ipc", ip=ip, **kwargs)

    nbval.kernel.KernelManager = _UnixSocketKernelManager
