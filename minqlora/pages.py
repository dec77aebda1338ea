"""PageTable: the bookkeeping of paged memory (lesson 08): where each page is, what moved.

    on_device   OrderedDict pid -> (n,) tensor on the device, least recently used first
    on_host     dict pid -> (n,) tensor in host memory (pinned on CUDA)
    counters    page_ins, page_outs, bytes_moved, resident_bytes, reserved_bytes, peak_bytes

A move copies one page across and counts it: paging out n bytes does resident_bytes -= n,
page_outs += 1, bytes_moved += n; paging in undoes the first and counts the other two again.
transaction() makes a group of calls all or nothing. Worked example: a page of 2 float32
(8 bytes) paged out and back in leaves resident_bytes as it was, with page_outs 1, page_ins 1
and bytes_moved 16.

Which page to move, and when, is the policy's business: pager.py's Pager evicts the least
recently used page under a device budget, on top of this table. What the pages hold is
paged_adam.py's.
"""
import contextlib
from collections import OrderedDict

import torch


class PageTable:
    """Pages of 1-D tensors on a device or in host memory, with counters and a timeline.

    timeline=True keeps (event, nbytes, resident_bytes, reserved_bytes) for each alloc, free,
    page_in, page_out, reserve, release and mark.
    """

    def __init__(self, device=None, timeline: bool = False):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.timeline = [] if timeline else None
        self.on_device = OrderedDict()  # pid -> (n,) tensor on the device, LRU first
        self.on_host = {}               # pid -> (n,) tensor in host memory (pinned on CUDA)
        self._next_id, self._stream = 0, None   # _stream: CUDA prefetch
        self.page_ins = self.page_outs = self.bytes_moved = 0
        self.resident_bytes = self.reserved_bytes = self.peak_bytes = 0

    def stats(self) -> dict:
        """The counters: page_ins, page_outs, bytes_moved, resident/reserved/peak_bytes."""
        return {n: getattr(self, n) for n in ("page_ins", "page_outs", "bytes_moved",
                                              "resident_bytes", "reserved_bytes", "peak_bytes")}


    @property
    def resident_pages(self) -> list:
        """Ids of the pages on the device, least recently used first."""
        return list(self.on_device)


    def page(self, pid: int) -> torch.Tensor:
        """Page pid's tensor, wherever it is (no paging, no counters)."""
        return self.on_device[pid] if pid in self.on_device else self.on_host[pid]


    def nbytes(self, pid: int) -> int:
        return self.page(pid).nbytes


    def _check_pids(self, pids, what: str) -> list:
        unknown = [pid for pid in pids if pid not in self.on_device and pid not in self.on_host]
        if unknown:
            raise ValueError(f"Pager.{what}: no page with id {unknown[0]!r} (freed, or never "
                             "allocated by this pager)")
        return list(pids)


    @contextlib.contextmanager
    def transaction(self):
        """All of the calls inside the `with` block, or, if one raises, none of them: the pages,
        their places, LRU order, counters and timeline are put back (what was written into a
        page's tensor is not)."""
        saved = (OrderedDict(self.on_device), dict(self.on_host), self.stats(), self._next_id,
                 len(self.timeline or ()))
        try:
            yield self
        except BaseException:
            on_device, on_host, stats, self._next_id, events = saved
            self._wait()
            self.on_device.clear(), self.on_device.update(on_device)
            self.on_host.clear(), self.on_host.update(on_host)
            for name, value in stats.items():
                setattr(self, name, value)
            del (self.timeline or [])[events:]
            raise


    def mark(self, event: str, nbytes: int = 0) -> None:
        """Update peak_bytes and log `event` (e.g. "step 3") on the timeline."""
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes + self.reserved_bytes)
        if self.timeline is not None:
            self.timeline.append((event, nbytes, self.resident_bytes, self.reserved_bytes))


    def _move(self, pid: int, to_device: bool, stream=None) -> None:
        """Copy page pid to the device or to host memory (on `stream`: a CUDA side stream)."""
        self._wait()
        cuda = self.device.type == "cuda"
        page = (self.on_host if to_device else self.on_device).pop(pid)
        new = torch.empty(page.shape, dtype=page.dtype, pin_memory=cuda and not to_device,
                          device=self.device if to_device else "cpu")
        with torch.cuda.stream(stream):   # None: the current stream (always, on CPU)
            new.copy_(page, non_blocking=cuda)
        (self.on_device if to_device else self.on_host)[pid] = new
        self.page_ins, self.page_outs = self.page_ins + to_device, self.page_outs + (not to_device)
        self.resident_bytes += new.nbytes if to_device else -new.nbytes
        self.bytes_moved += new.nbytes
        self.mark("page_in" if to_device else "page_out", new.nbytes)


    def _wait(self) -> None:
        """CUDA: the current stream waits for the prefetch copies."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)


    def free(self, pids) -> None:
        """Forget these pages, wherever they are."""
        pids = self._check_pids(pids, "free")
        if len(set(pids)) != len(pids):
            raise ValueError("Pager.free: a page id is listed twice")
        self._wait()
        for pid in pids:
            if pid in self.on_device:
                page = self.on_device.pop(pid)
                self.resident_bytes -= page.nbytes
            else:
                page = self.on_host.pop(pid)
            self.mark("free", page.nbytes)


    def gather(self, pids) -> torch.Tensor:
        """One 1-D copy of the pages' contents, read wherever they are (no paging, no counters)."""
        pids = self._check_pids(pids, "gather")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # pending page-outs have landed on the host
        return torch.cat([self.page(pid).to(self.device) for pid in pids])


def check_nbytes(value, what: str, also: str = "", lowest: int = 0, highest=float("inf")):
    """A ValueError unless value is an int (not a bool) in [lowest, highest]."""
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
        raise ValueError(f"{what} must be an int >= {lowest}{also}, got {value!r}")
