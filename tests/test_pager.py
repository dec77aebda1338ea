"""pager.py: LRU eviction under a device budget, the counters and the timeline, and errors that
name the numbers (the optimizer over it: tests/test_paged_adam.py)."""
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minqlora.pager import OutOfBudget, Pager


def test_pager_lru_worked_by_hand():
    """Budget 3 pages of 8 bytes. alloc 6 floats -> pages 0, 1, 2 (LRU order 0 1 2). use(0)
    -> 1 2 0. reserve(8) evicts the LRU page, 1 -> 2 0. use(1) pages 1 back in by evicting 2
    -> 0 1. reserve(16) more evicts 0 then 1. Counters: ins 1, outs 4, bytes moved 5 * 8."""
    pager = Pager(24, page_bytes=8, device="cpu", timeline=True)
    pages = pager.alloc(6, data=torch.arange(6.0))
    with pager.use([pages[0]]):
        pass
    pager.reserve(8)
    assert pager.resident_pages == [2, 0]
    with pager.use([pages[1]]) as (b,):
        assert b.tolist() == [2.0, 3.0]
    assert pager.resident_pages == [0, 1]
    pager.reserve(16)
    assert pager.stats() == dict(page_ins=1, page_outs=4, bytes_moved=40, resident_bytes=0,
                                 reserved_bytes=24, peak_bytes=24)
    assert [e[0] for e in pager.timeline] == ["alloc"] * 3 + [
        "page_out", "reserve", "page_out", "page_in", "page_out", "page_out", "reserve"]
    assert pager.gather(pages).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_out_of_budget_error_names_the_numbers():
    pager = Pager(100, page_bytes=40, device="cpu")
    pages = pager.alloc(20)                          # 40 + 40 bytes resident
    with pytest.raises(OutOfBudget, match=r"reserve of 120 bytes .* budget of 100 bytes: 0 "
                                          r"reserved, 80 resident .* at most 80 bytes"):
        pager.reserve(120)
    pager.reserve(60)                                # evicts one page (40 bytes)
    with pytest.raises(OutOfBudget, match=r"use of 40 bytes .* 60 reserved, 40 resident \(40 "
                                          r"of them in use now\), so at most 0 bytes"):
        with pager.use(pages):
            pass
    off = Pager(100, page_bytes=40, device="cpu", evict=False)
    off.alloc(20)
    with pytest.raises(OutOfBudget, match=r"at most 0 bytes can be evicted \(evict=False"):
        off.reserve(40)


@settings(max_examples=40, deadline=None)
@given(budget_pages=st.integers(1, 6), numels=st.lists(st.integers(1, 13), min_size=1, max_size=4),
       ops=st.lists(st.tuples(st.sampled_from(["use", "spike", "prefetch"]), st.integers(0, 50)),
                    max_size=30))
def test_pager_keeps_contents_and_budget(budget_pages, numels, ops):
    """Whatever the sequence of uses (each adds k to a page), spikes (held until the next one)
    and prefetches: pages keep their contents, device use never exceeds the budget, and `use`
    fails only when the spike leaves no room for one page."""
    pager = Pager(16 * budget_pages, page_bytes=16, device="cpu")   # 4 float32 per page
    handles = [pager.alloc(n, data=torch.arange(float(n))) for n in numels]
    expected = [torch.arange(float(n)) for n in numels]
    where = [(i, j * 4) for i, h in enumerate(handles) for j in range(len(h))]
    pages = [p for h in handles for p in h]
    for op, k in ops:
        if op == "use":
            i, start = where[k % len(pages)]
            try:
                with pager.use([pages[k % len(pages)]]) as (t,):
                    t.add_(k)
                expected[i][start:start + 4] += k
            except OutOfBudget:
                assert pager.reserved_bytes + 16 > pager.budget
        elif op == "spike":
            pager.release(pager.reserved_bytes)
            pager.reserve(16 * (k % (budget_pages + 1)))
        else:
            pager.prefetch(pages[k % len(pages):])
        assert pager.resident_bytes + pager.reserved_bytes <= pager.budget
        assert pager.resident_bytes == sum(pager.nbytes(p) for p in pager.resident_pages)
    assert pager.peak_bytes <= pager.budget
    for h, e in zip(handles, expected):
        assert torch.equal(pager.gather(h), e)


def test_bad_pager_arguments():
    with pytest.raises(ValueError, match="device_budget_bytes must be an int >= 0 or None, got -5"):
        Pager(-5)
    with pytest.raises(ValueError, match="page_bytes must be an int >= 1, got 0"):
        Pager(10, page_bytes=0)
    pager = Pager(100, device="cpu")
    with pytest.raises(ValueError, match="release: nbytes must be an int >= 0 and <= 0, got 4"):
        pager.release(4)
    with pytest.raises(ValueError, match="reserve: nbytes must be an int >= 0, got -1"):
        pager.reserve(-1)


class ReferenceLRU:
    """Lesson 08's LRU rule in a few lines, on page sizes only: an OrderedDict of resident pages
    (least recently used first), evicting from its front, except pages held, until a request
    fits; OutOfBudget (before anything moves) when even that cannot make room."""

    def __init__(self, budget):
        self.budget, self.reserved, self.resident, self.evicted = budget, 0, OrderedDict(), []

    def make_room(self, nbytes, held=()):
        victims = [pid for pid in self.resident if pid not in held]
        if sum(self.resident[p] for p in held if p in self.resident) + self.reserved + nbytes \
                > self.budget:
            raise OutOfBudget("reference")
        while sum(self.resident.values()) + self.reserved + nbytes > self.budget:
            pid = victims.pop(0)
            self.evicted.append(pid)
            del self.resident[pid]

    def page_in(self, pid, nbytes, held=()):
        if pid not in self.resident:
            self.make_room(nbytes, held)
            self.resident[pid] = nbytes
        self.resident.move_to_end(pid)

    def use(self, pids, sizes):
        """All of pids paged in, or (OutOfBudget) none: checked before the first one moves."""
        missing = sum(sizes[pid] for pid in pids if pid not in self.resident)
        if missing and sum(self.resident[p] for p in pids if p in self.resident) \
                + self.reserved + missing > self.budget:
            raise OutOfBudget("reference")
        for pid in pids:
            self.page_in(pid, sizes[pid], held=pids)


def outcome(fn):
    try:
        fn()
        return "ok"
    except OutOfBudget:
        return "OutOfBudget"


@settings(max_examples=80, deadline=None)
@given(budget_pages=st.integers(1, 8), numels=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       ops=st.lists(st.tuples(st.sampled_from(["use", "reserve", "release"]), st.integers(0, 40)),
                    max_size=40))
def test_evicts_in_the_order_of_the_reference_lru(budget_pages, numels, ops):
    """Random allocs, uses (of one or two pages), reserves and releases: the pager pages out the
    same pages, in the same order, as the reference rule, keeps the same resident pages, and
    raises OutOfBudget exactly when the reference does (a use of two pages that cannot both fit
    moves neither)."""
    pager = Pager(16 * budget_pages, page_bytes=16, device="cpu")
    ref = ReferenceLRU(16 * budget_pages)
    evicted, move = [], pager._move
    pager._move = lambda pid, to_device, stream=None: (
        evicted.append(pid) if not to_device else None, move(pid, to_device, stream))
    sizes = {}
    for n in numels:
        sizes.update({pid: 16 for pid in range(len(sizes), len(sizes) + n // 4)})
        if n % 4:
            sizes[len(sizes)] = 4 * (n % 4)
    pages = list(sizes)
    mine = outcome(lambda: [pager.alloc(n) for n in numels])
    theirs = outcome(lambda: [ref.page_in(pid, sizes[pid]) for pid in pages])
    assert mine == theirs
    for op, k in ops:
        if op == "use":
            pids = list(dict.fromkeys([pages[k % len(pages)], pages[(k * 7) % len(pages)]]))
            pids = [pid for pid in pids if pid in pager.on_device or pid in pager.on_host]

            def use():
                with pager.use(pids):
                    pass
            mine = outcome(use)
            theirs = outcome(lambda: ref.use(pids, sizes))
        elif op == "reserve":
            mine = outcome(lambda: pager.reserve(4 * (k % 9)))
            theirs = outcome(lambda: ref.make_room(4 * (k % 9)))
            ref.reserved += 4 * (k % 9) if theirs == "ok" else 0
        else:
            mine, theirs = outcome(lambda: pager.release(pager.reserved_bytes)), "ok"
            ref.reserved = 0
        assert mine == theirs
        assert pager.resident_pages == list(ref.resident) and evicted == ref.evicted


def test_a_request_that_cannot_fit_changes_nothing():
    """OutOfBudget is raised before any page moves: same pages, same counters, same timeline."""
    pager = Pager(64, page_bytes=16, device="cpu", timeline=True)
    pages = pager.alloc(12)                               # 3 pages of 16 bytes
    with pager.use([pages[1]]):
        before = (pager.resident_pages, pager.stats(), len(pager.timeline))
        with pytest.raises(OutOfBudget, match="reserve of 60 bytes .* at most 32 bytes"):
            pager.reserve(60)                             # page 1 is held: 48 - 16 evictable
        assert (pager.resident_pages, pager.stats(), len(pager.timeline)) == before
        pager.reserve(40)                                 # evicts pages 0 and 2, never 1
        assert pager.resident_pages == [pages[1]]


def test_free_forgets_pages_wherever_they_are():
    pager = Pager(32, page_bytes=8, device="cpu")
    pages = pager.alloc(8, data=torch.arange(8.0))        # 4 pages, 32 bytes: the whole budget
    pager.reserve(16)                                     # pages 0 and 1 go to the host
    assert set(pager.on_host) == set(pages[:2]) and pager.resident_bytes == 16
    pager.free([pages[0], pages[3]])                      # one evicted, one resident
    assert set(pager.on_host) == {pages[1]} and pager.resident_pages == [pages[2]]
    assert pager.resident_bytes == 8 and pager.gather(pages[1:3]).tolist() == [2, 3, 4, 5]
    with pytest.raises(KeyError):
        pager.nbytes(pages[0])


def test_prefetch_fills_free_room_in_order_and_never_evicts():
    pager = Pager(32, page_bytes=8, device="cpu")
    pages = pager.alloc(8)
    pager.reserve(32)                                      # everything out
    pager.release(16)                                      # room for 2 pages
    ins = pager.page_ins
    pager.prefetch(pages[::-1])                            # 3, 2 fit; then the room is full
    assert pager.resident_pages == [pages[3], pages[2]] and pager.page_ins == ins + 2
    assert pager.page_outs == 4                            # nothing more was evicted


def snapshot(pager):
    """Everything a failed call must leave as it was."""
    return (list(pager.on_device), sorted(pager.on_host), pager.stats(), list(pager.timeline or ()),
            {pid: pager.page(pid).clone() for pid in [*pager.on_device, *pager.on_host]})


def same(a, b):
    return a[:4] == b[:4] and a[4].keys() == b[4].keys() and all(
        torch.equal(a[4][k], b[4][k]) for k in a[4])


@pytest.mark.parametrize("call, error", [
    (lambda pg, pages: pg.alloc(10, data=torch.ones(4)), "data must be a tensor of numel=10"),
    (lambda pg, pages: pg.alloc(-1), "numel must be an int >= 0"),
    (lambda pg, pages: pg.alloc(4, dtype="float32"), "dtype must be a torch.dtype"),
    (lambda pg, pages: pg.free([pages[0], 99]), "no page with id 99"),
    (lambda pg, pages: pg.free([pages[0], pages[0]]), "listed twice"),
    (lambda pg, pages: pg.use([pages[1], 99]).__enter__(), "no page with id 99"),
    (lambda pg, pages: pg.prefetch([99]), "no page with id 99"),
    (lambda pg, pages: pg.gather([99]), "no page with id 99"),
])
def test_a_bad_call_changes_nothing(call, error):
    """Item 5 (issue 10): alloc(10, data=torch.ones(4)) used to raise after counting 24 bytes
    as resident, for good. Every refused call leaves pages, counters and timeline as they were."""
    pager = Pager(64, page_bytes=16, device="cpu", timeline=True)
    pages = pager.alloc(12, data=torch.arange(12.0))
    pager.reserve(24)                                     # page 0 goes to the host
    before = snapshot(pager)
    with pytest.raises((ValueError, TypeError), match=error):
        call(pager, pages)
    assert same(snapshot(pager), before)
    assert pager.alloc(1) == (3,)                         # ids are not used up either


@pytest.mark.parametrize("evict", [False, True])
def test_an_alloc_that_does_not_fit_changes_nothing(evict):
    """evict=False: the third page of an alloc does not fit after two were placed; evict=True:
    the reserved bytes leave no room for one page. Either way the pager is as it was."""
    pager = Pager(64, page_bytes=16, device="cpu", evict=evict, timeline=True)
    pager.alloc(4, data=torch.ones(4))
    pager.reserve(8 if not evict else 56)
    before = snapshot(pager)
    with pytest.raises(OutOfBudget, match="alloc of 16 bytes"):
        pager.alloc(12)
    assert same(snapshot(pager), before)


def test_a_use_that_cannot_fit_every_page_changes_nothing():
    """use([a, b]) where a fits but a and b together do not: refused before a moves."""
    pager = Pager(48, page_bytes=16, device="cpu", timeline=True)
    pages = pager.alloc(8)                               # 2 pages
    pager.reserve(48)                                    # both out
    pager.release(16)                                    # room for one page
    before = snapshot(pager)
    with pytest.raises(OutOfBudget, match="use of 32 bytes"):
        with pager.use(list(pages)):
            pass
    assert same(snapshot(pager), before)


def test_transaction_puts_everything_back():
    pager = Pager(64, page_bytes=16, device="cpu", timeline=True)
    pages = pager.alloc(12, data=torch.arange(12.0))
    before = snapshot(pager)
    with pytest.raises(KeyError, match="boom"):
        with pager.transaction():
            pager.free(pages[:2])
            pager.alloc(16)                               # evicts page 2
            pager.reserve(16)
            raise KeyError("boom")
    assert same(snapshot(pager), before)
    assert pager.alloc(1) == (3,)


@settings(max_examples=60, deadline=None)
@given(evict=st.booleans(), ops=st.lists(st.tuples(
    st.sampled_from(["alloc", "bad_alloc", "free", "use", "reserve", "release", "prefetch"]),
    st.integers(-3, 40)), max_size=25))
def test_any_raising_call_leaves_the_pager_unchanged(evict, ops):
    """Random calls, valid or not: a call that raises leaves the snapshot as it was, and the
    counters always describe the pages."""
    pager = Pager(64, page_bytes=16, device="cpu", evict=evict, timeline=True)
    live = []
    for op, k in ops:
        before = snapshot(pager)
        pid = live[k % len(live)] if live and k >= 0 else 1000 + k
        calls = {"alloc": lambda: live.extend(pager.alloc(k, data=torch.arange(float(max(k, 0))))),
                 "bad_alloc": lambda: pager.alloc(k, data=torch.ones(abs(k) + 1)),
                 "free": lambda: (pager.free([pid]), live.remove(pid)),
                 "use": lambda: pager.use([pid, live[(k * 7) % len(live)] if live else pid])
                 .__enter__(),
                 "reserve": lambda: pager.reserve(4 * k), "release": lambda: pager.release(4 * k),
                 "prefetch": lambda: pager.prefetch([pid])}
        try:
            calls[op]()
            pager._in_use = ()                            # leave use's `with` block
        except (OutOfBudget, ValueError, TypeError):
            assert same(snapshot(pager), before), op
        assert pager.resident_bytes == sum(pager.nbytes(p) for p in pager.on_device)
        assert pager.resident_bytes + pager.reserved_bytes <= pager.budget


def test_the_default_page_fits_a_small_budget():
    """Item 6 (issue 10): a 279,218-byte budget and 2 MiB pages could not hold the state of one
    300x300 weight (360 kB per moment, one page each): the first step raised OutOfBudget. The
    default page is now an eighth of a small budget, so the step pages, bit-identical to torch;
    an explicit page_bytes is honoured as before."""
    from minqlora.paged_adam import PagedAdamW
    assert Pager(None).page_bytes == Pager(1 << 30).page_bytes == 1 << 21
    assert Pager(279_218).page_bytes == 34_880 and Pager(100).page_bytes == 64
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 300))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], foreach=False)
    opt = PagedAdamW([b], pager=Pager(279_218, device="cpu"))
    for _ in range(3):
        g = torch.randn(300, 300)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step(), opt.step()
    assert torch.equal(a, b) and opt.pager.page_outs > 0
    b.grad = torch.ones(300, 300)
    with pytest.raises(OutOfBudget):
        PagedAdamW([b], pager=Pager(279_218, page_bytes=1 << 21, device="cpu")).step()
