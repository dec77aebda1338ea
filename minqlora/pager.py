"""Pager: fixed-size pages on the device while they fit, in host memory when not (lesson 08).

QLoRA's paged optimizers keep their state in CUDA unified memory: when a memory spike (a long
batch's activations) fills the GPU, pages of state move to CPU memory and come back when the
update touches them. Here every move is explicit and counted. The one rule:

    resident_bytes + reserved_bytes <= device_budget_bytes

`on_device` is an OrderedDict of the pages on the device, least recently used first: `reserve`
(the spike) and `use` (page in for the update) page out from its front until the rule holds,
and `use` moves what it touches to the back. A request that cannot fit raises OutOfBudget,
naming the numbers, before anything moves. Worked example:

>>> pager = Pager(32, page_bytes=8, device="cpu")   # room for 4 pages of 2 float32
>>> pager.alloc(6)                                  # 3 pages, 24 bytes
(0, 1, 2)
>>> pager.reserve(16); pager.resident_pages         # 24 + 16 > 32: page 0, the LRU, goes out
[1, 2]

On a CPU-only machine the device is SIMULATED: both sides are CPU tensors, with the same logic,
copies and counters (the mechanism, not PCIe speed). On CUDA, device pages are GPU tensors,
host pages pinned CPU tensors, and `prefetch` copies on a side stream that `use` waits for.
This module is the policy (what to evict, when, and what fits); where each page is, the moves
and their counters are the bookkeeping of pages.py's PageTable, which Pager extends. What the
pages hold is paged_adam.py's business.
"""
import contextlib

import torch

from .pages import PageTable, check_nbytes


class OutOfBudget(RuntimeError):
    """A request that does not fit the device budget even after evicting all it may."""


PAGE_BYTES = 1 << 21  # a large page of CUDA unified memory


class Pager(PageTable):
    """Pages of 1-D tensors under a device budget (None: no limit); LRU eviction to host.

    page_bytes defaults to 2 MiB, or to an eighth of a smaller budget (a multiple of 64 bytes),
    so that a small budget pages instead of refusing a whole 2 MiB page. evict=False is a plain
    GPU: what does not fit raises. timeline=True keeps (event, nbytes, resident_bytes,
    reserved_bytes) for each alloc, free, page_in, page_out, reserve, release and mark. A call
    that raises leaves the pager as it was.
    """

    def __init__(self, device_budget_bytes, page_bytes: int = None, device=None,
                 evict: bool = True, timeline: bool = False):
        if device_budget_bytes is not None:
            check_nbytes(device_budget_bytes, "Pager: device_budget_bytes", " or None")
        if page_bytes is None:
            page_bytes = PAGE_BYTES if device_budget_bytes is None else \
                max(64, min(PAGE_BYTES, device_budget_bytes // 8 // 64 * 64))
        check_nbytes(page_bytes, "Pager: page_bytes", lowest=1)
        super().__init__(device, timeline)
        self.budget = float("inf") if device_budget_bytes is None else device_budget_bytes
        self.page_bytes, self.evict, self._in_use = page_bytes, evict, ()

    def _check_room(self, nbytes: int, what: str) -> None:
        """OutOfBudget unless nbytes more fit once every page `use` does not hold is evicted."""
        held = self._in_use
        evictable = self.evict * sum(self.nbytes(p) for p in self.on_device if p not in held)
        if self.resident_bytes + self.reserved_bytes + nbytes - evictable > self.budget:
            raise self._refusal(nbytes, what, evictable)

    def _make_room(self, nbytes: int, what: str) -> None:
        """Page out least recently used pages, except those `use` holds, until nbytes more fit."""
        self._check_room(nbytes, what)                          # before any page moves
        victims = [pid for pid in self.on_device if pid not in self._in_use]   # LRU first
        while self.resident_bytes + self.reserved_bytes + nbytes > self.budget:
            self._move(victims.pop(0), to_device=False)

    def _refusal(self, nbytes: int, what: str, evictable: int) -> OutOfBudget:
        held = sum(self.nbytes(pid) for pid in self._in_use if pid in self.on_device)
        return OutOfBudget(
            f"Pager: {what} of {nbytes} bytes does not fit the device budget of {self.budget} "
            f"bytes: {self.reserved_bytes} reserved, {self.resident_bytes} resident ({held} of "
            f"them in use now), so at most {evictable} bytes can be evicted"
            + ("" if self.evict else " (evict=False: paging is off)"))

    def alloc(self, numel: int, dtype=torch.float32, data=None) -> tuple:
        """Page ids for `numel` elements (zeros, or a copy of 1-D `data`), on the device;
        each page holds page_bytes // itemsize elements, the last one fewer.

        >>> Pager(None, page_bytes=8, device="cpu").alloc(5)  # 2 + 2 + 1 float32
        (0, 1, 2)
        """
        check_nbytes(numel, "Pager.alloc: numel")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"Pager.alloc: dtype must be a torch.dtype, got {dtype!r}")
        if data is not None and (not isinstance(data, torch.Tensor) or data.numel() != numel):
            got = f"{data.numel()} elements" if isinstance(data, torch.Tensor) else type(data)
            raise ValueError(f"Pager.alloc: data must be a tensor of numel={numel} elements, "
                             f"got {got}")
        per, pids = max(1, self.page_bytes // dtype.itemsize), []
        flat = None if data is None else data.reshape(-1)
        with self.transaction():       # evict=False: a page that does not fit undoes the rest
            for start in range(0, numel, per):
                n = min(per, numel - start)
                self._make_room(n * dtype.itemsize, "alloc")
                pid, self._next_id = self._next_id, self._next_id + 1
                self.on_device[pid] = (
                    torch.zeros(n, dtype=dtype, device=self.device) if flat is None
                    else flat[start:start + n].to(self.device, dtype, copy=True))
                self.resident_bytes += n * dtype.itemsize
                self.mark("alloc", n * dtype.itemsize)
                pids.append(pid)
        return tuple(pids)

    @contextlib.contextmanager
    def use(self, pids):
        """Page in `pids` (evicting LRU pages not in use) and yield their device tensors;
        inside the `with` block they are the most recently used and cannot be evicted."""
        pids = self._check_pids(pids, "use")
        self._in_use = pids
        try:                           # all of them fit, or OutOfBudget before anything moves
            need = sum(self.nbytes(pid) for pid in dict.fromkeys(pids) if pid not in self.on_device)
            if need:
                self._check_room(need, "use")
            for pid in pids:
                if pid not in self.on_device:
                    self._make_room(self.nbytes(pid), "use")
                    self._move(pid, to_device=True)
                self.on_device.move_to_end(pid)
            self._wait()
            yield [self.on_device[pid] for pid in pids]
        finally:
            self._in_use = ()

    def prefetch(self, pids) -> None:
        """Page in, in order, those of `pids` that fit in the free room; never evicts.
        On CPU the copies happen now; on CUDA on a side stream that `use` waits for."""
        for pid in (pid for pid in self._check_pids(pids, "prefetch") if pid not in self.on_device):
            if self.resident_bytes + self.reserved_bytes + self.nbytes(pid) > self.budget:
                return
            if self.device.type == "cuda":   # the side stream starts once the host page is written
                self._stream = self._stream or torch.cuda.Stream(self.device)
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self._move(pid, to_device=True, stream=self._stream)

    def reserve(self, nbytes: int) -> None:
        """Claim `nbytes` of the budget (a memory spike), evicting LRU pages to make room."""
        check_nbytes(nbytes, "Pager.reserve: nbytes")
        self._make_room(nbytes, "reserve")
        self.reserved_bytes += nbytes
        self.mark("reserve", nbytes)

    def release(self, nbytes: int) -> None:
        """End (part of) a reservation. Pages come back lazily, when `use` touches them."""
        check_nbytes(nbytes, "Pager.release: nbytes", f" and <= {self.reserved_bytes}",
                      highest=self.reserved_bytes)
        self.reserved_bytes -= nbytes
        self.mark("release", nbytes)
