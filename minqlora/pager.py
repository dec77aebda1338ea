"""Pager: fixed-size pages on the device while they fit, in host memory when not (lesson 08).

QLoRA's paged optimizers put their state in CUDA unified memory: when a memory spike (a long
batch's activations) fills the GPU, pages of optimizer state move to CPU memory and come back
when the update touches them. This module makes that mechanism visible. The one rule:

    device use = resident pages + reserved bytes <= device_budget_bytes

`use(pages)` pages in what is on the host, first evicting least-recently-used pages that are
not in use until it fits; `reserve(nbytes)` (the spike) evicts the same way and `release`
ends it. A request that cannot fit even with every other page evicted raises OutOfBudget,
naming the numbers. Worked example: budget 32 bytes, page_bytes 8, alloc 6 float32 -> pages
of 2, 2, 2 elements (24 bytes resident); reserve(16) evicts the least recently used page:
resident 16 + reserved 16 = 32, page_outs 1.

Where the pages live: on CUDA, device pages are GPU tensors and host pages pinned CPU tensors,
and `prefetch` copies on a side stream. That CUDA path has NOT been run on a GPU yet. On a
CPU-only machine the device is SIMULATED: "device" and "host" are both CPU tensors, with the
same logic, copies and counters. What is stored in the pages is the optimizer's business
(paged_adam.py).
"""
import contextlib
from collections import OrderedDict

import torch


class OutOfBudget(RuntimeError):
    """A request that does not fit in the pager's device budget, even after evicting."""


class Pager:
    """Pages of 1-D tensors under a device budget; LRU eviction to host memory.

    page_bytes defaults to 2 MiB, the large page of CUDA unified memory.
    device_budget_bytes=None means no limit. evict=False turns paging off (a plain GPU: a
    request that does not fit raises). timeline=True records (event, nbytes, resident,
    reserved) for each page-in/out, alloc, free, reserve, release and mark.

    >>> pager = Pager(32, page_bytes=8, device="cpu")
    >>> pages = pager.alloc(6)                       # 6 float32 = 3 pages of 2
    >>> pager.reserve(16); pager.stats()["page_outs"], pager.resident_bytes
    (1, 16)
    >>> with pager.use(pages) as (a, b, c): a.shape  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    minqlora.pager.OutOfBudget: Pager: use of 8 bytes does not fit the device budget of 32 bytes: ...

    (a is out; b and c are in use and 16 bytes are reserved: nothing can be evicted for a.)
    """

    def __init__(self, device_budget_bytes, page_bytes: int = 1 << 21, device=None,
                 evict: bool = True, timeline: bool = False):
        if device_budget_bytes is not None and (not isinstance(device_budget_bytes, int)
                                                or device_budget_bytes < 0):
            raise ValueError(f"Pager: device_budget_bytes must be an int >= 0 or None, "
                             f"got {device_budget_bytes!r}")
        if not isinstance(page_bytes, int) or page_bytes < 1:
            raise ValueError(f"Pager: page_bytes must be an int >= 1, got {page_bytes!r}")
        self.budget = float("inf") if device_budget_bytes is None else device_budget_bytes
        self.page_bytes, self.evict = page_bytes, evict
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._cuda = self.device.type == "cuda"
        self._dev = OrderedDict()   # pid -> 1-D device tensor, least recently used first
        self._host = {}             # pid -> 1-D host tensor (pinned on CUDA), kept once made
        self._size = {}             # pid -> (numel, dtype, nbytes)
        self._events, self._stream, self._in_use, self._next = {}, None, set(), 0
        self.page_ins = self.page_outs = self.bytes_moved = 0
        self.resident_bytes = self.reserved_bytes = self.peak_bytes = 0
        self.timeline = [] if timeline else None

    def stats(self) -> dict:
        """The counters: page_ins, page_outs, bytes_moved, resident/reserved/peak_bytes."""
        return {n: getattr(self, n) for n in ("page_ins", "page_outs", "bytes_moved",
                                              "resident_bytes", "reserved_bytes", "peak_bytes")}

    def nbytes(self, pid: int) -> int:
        """The size of page `pid` in bytes."""
        return self._size[pid][2]

    def _log(self, event: str, nbytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes + self.reserved_bytes)
        if self.timeline is not None:
            self.timeline.append((event, nbytes, self.resident_bytes, self.reserved_bytes))

    def mark(self, label: str) -> None:
        """Put a label (e.g. "step 3") on the timeline."""
        self._log(label, 0)

    def _make_room(self, nbytes: int, what: str) -> None:
        over = self.resident_bytes + self.reserved_bytes + nbytes - self.budget
        if over <= 0:
            return
        victims = [pid for pid in self._dev if pid not in self._in_use]   # LRU first
        free = sum(self._size[pid][2] for pid in victims) if self.evict else 0
        if free < over:
            busy = sum(self._size[pid][2] for pid in self._in_use if pid in self._dev)
            raise OutOfBudget(
                f"Pager: {what} of {nbytes} bytes does not fit the device budget of "
                f"{self.budget} bytes: {self.reserved_bytes} reserved, {self.resident_bytes} "
                f"resident ({busy} of them in use now), so at most {free} bytes can be evicted"
                + ("" if self.evict else " (evict=False: paging is off)"))
        for pid in victims:
            if over <= 0:
                break
            self._page_out(pid)
            over -= self._size[pid][2]

    def _wait(self, pid: int) -> None:
        """CUDA: make the current stream wait for a prefetch copy of pid (never run on a GPU)."""
        event = self._events.pop(pid, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self._dev[pid].record_stream(torch.cuda.current_stream(self.device))

    def _page_out(self, pid: int) -> None:
        self._wait(pid)
        numel, dtype, nbytes = self._size[pid]
        if pid not in self._host:
            self._host[pid] = torch.empty(numel, dtype=dtype, pin_memory=self._cuda)
        self._host[pid].copy_(self._dev.pop(pid), non_blocking=self._cuda)
        self.page_outs, self.bytes_moved, self.resident_bytes = (
            self.page_outs + 1, self.bytes_moved + nbytes, self.resident_bytes - nbytes)
        self._log("page_out", nbytes)

    def _page_in(self, pid: int) -> None:
        numel, dtype, nbytes = self._size[pid]
        page = torch.empty(numel, dtype=dtype, device=self.device)
        self._dev[pid] = page.copy_(self._host[pid], non_blocking=self._cuda)
        self.page_ins, self.bytes_moved, self.resident_bytes = (
            self.page_ins + 1, self.bytes_moved + nbytes, self.resident_bytes + nbytes)
        self._log("page_in", nbytes)

    def alloc(self, numel: int, dtype=torch.float32, data=None) -> tuple:
        """New pages for `numel` elements (zeros, or a copy of 1-D `data`), on the device.

        Each page holds page_bytes // itemsize elements, the last one fewer. Returns page ids.
        >>> Pager(None, page_bytes=8, device="cpu").alloc(5)  # 2 + 2 + 1 float32
        (0, 1, 2)
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        per, pids = max(1, self.page_bytes // itemsize), []
        for start in range(0, numel, per):
            n = min(per, numel - start)
            nbytes = n * itemsize
            self._make_room(nbytes, "alloc")
            pid, self._next = self._next, self._next + 1
            self._size[pid] = (n, dtype, nbytes)
            self._dev[pid] = (torch.zeros(n, dtype=dtype, device=self.device) if data is None
                              else data[start:start + n].to(self.device, dtype, copy=True))
            self.resident_bytes += nbytes
            self._log("alloc", nbytes)
            pids.append(pid)
        return tuple(pids)

    def free(self, pids) -> None:
        """Forget these pages, wherever they are."""
        for pid in pids:
            self._events.pop(pid, None)
            if self._dev.pop(pid, None) is not None:
                self.resident_bytes -= self._size[pid][2]
            self._host.pop(pid, None)
            self._log("free", self._size.pop(pid)[2])

    @contextlib.contextmanager
    def use(self, pids):
        """Page in `pids` (evicting LRU pages not in use) and yield their device tensors.

        The pages count as most recently used and cannot be evicted inside the `with` block.
        """
        self._in_use = set(pids)
        try:
            for pid in pids:
                if pid not in self._dev:
                    self._make_room(self._size[pid][2], "use")
                    self._page_in(pid)
                self._dev.move_to_end(pid)
                self._wait(pid)
            yield [self._dev[pid] for pid in pids]
        finally:
            self._in_use = set()

    def prefetch(self, pids) -> None:
        """Start paging in `pids` that fit in the free room; never evicts.

        On CUDA the copies run on a side stream and `use` waits for them (never run on a GPU);
        on CPU they happen now.
        """
        for pid in pids:
            if pid in self._dev:
                continue
            if self.resident_bytes + self.reserved_bytes + self._size[pid][2] > self.budget:
                return
            if not self._cuda:
                self._page_in(pid)
                continue
            self._stream = self._stream or torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # host page written
            with torch.cuda.stream(self._stream):
                self._page_in(pid)
                self._events[pid] = torch.cuda.Event()
                self._events[pid].record(self._stream)

    def gather(self, pids, device=None) -> torch.Tensor:
        """One 1-D copy of the pages' contents, read wherever they are (no paging, no counters)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)   # pending page-outs have landed on the host
        parts = [self._dev[pid] if pid in self._dev else self._host[pid] for pid in pids]
        return torch.cat([p.to(device or self.device) for p in parts])

    def reserve(self, nbytes: int) -> None:
        """Claim `nbytes` of the budget (a memory spike), evicting LRU pages to make room."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"Pager.reserve: nbytes must be an int >= 0, got {nbytes!r}")
        self._make_room(nbytes, "reserve")
        self.reserved_bytes += nbytes
        self._log("reserve", nbytes)

    def release(self, nbytes: int) -> None:
        """End (part of) a reservation. Pages come back lazily, when `use` touches them."""
        if not isinstance(nbytes, int) or not 0 <= nbytes <= self.reserved_bytes:
            raise ValueError(f"Pager.release: nbytes must be an int in [0, {self.reserved_bytes}]"
                             f" (the bytes reserved), got {nbytes!r}")
        self.reserved_bytes -= nbytes
        self._log("release", nbytes)

    def evict_all(self) -> None:
        """Page out every page not in use (forces paging, e.g. in tests)."""
        for pid in [pid for pid in self._dev if pid not in self._in_use]:
            self._page_out(pid)
