"""paged_adam.py: PagedAdamW bit-identical to torch.optim.AdamW(foreach=False), paged or not,
through checkpoints and LR schedulers, under budgets smaller than one parameter's state (the
pager itself: tests/test_pager.py)."""
import copy
import io
import math

import pytest
import torch

from minqlora.paged_adam import PagedAdamW
from minqlora.pager import OutOfBudget, Pager

HYPER = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 31), torch.nn.Tanh(),
                               torch.nn.Linear(31, 4)).to(dtype)


def twins(pager=None, dtype=torch.float32, groups=lambda m: m.parameters(), **kwargs):
    """The same small model twice: one for torch.optim.AdamW(foreach=False), one for PagedAdamW."""
    ref, model = small_model(dtype=dtype), small_model(dtype=dtype)
    ref_opt = torch.optim.AdamW(groups(ref), foreach=False, **HYPER)
    return ref, ref_opt, model, PagedAdamW(groups(model), pager=pager, **HYPER, **kwargs)


def train_step(model, opt, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(16, 9, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
    opt.step()


def train_both(pairs, steps, dtype=torch.float32, between=lambda step: None):
    """Step every (model, optimizer) pair; after each step all models must be bit-identical."""
    for step in steps:
        for model, opt in pairs:
            train_step(model, opt, step, dtype)
        between(step)
        for (name, a), *others in zip(pairs[0][0].named_parameters(),
                                      *(m.parameters() for m, _ in pairs[1:])):
            for b in others:
                assert torch.equal(a, b), f"step {step}: {name} differs by {(a - b).abs().max()}"


@pytest.mark.parametrize("is_paged", [False, True])
def test_bit_identical_to_torch_adamw_without_paging(is_paged):
    ref, ref_opt, model, opt = twins(is_paged=is_paged)
    train_both([(ref, ref_opt), (model, opt)], range(60))
    if is_paged:
        n = 9 * 31 + 31 + 31 * 4 + 4                 # 438 trainable parameters
        assert opt.pager.page_outs == 0 and opt.pager.resident_bytes == 8 * n  # m, v in fp32


def test_bit_identical_with_paging_forced_every_step():
    """Budget: 2 pages of 64 bytes (16 floats), far less than one weight's state (279 floats
    of m and 279 of v = 2232 bytes): each step pages m and v in page by page, and a spike after
    each step evicts all of it."""
    pager = Pager(128, page_bytes=64, device="cpu")
    ref, ref_opt, model, opt = twins(pager)
    page_ins = []

    def spike(step):
        page_ins.append(pager.page_ins)
        pager.reserve(128)                           # nothing of the state stays resident
        assert pager.resident_bytes == 0
        pager.release(128)
    train_both([(ref, ref_opt), (model, opt)], range(55), between=spike)
    per_step = [b - a for a, b in zip(page_ins, page_ins[1:])]
    assert min(per_step) >= 2 * math.ceil(279 / 16), "every page of m and v comes back every step"
    assert pager.peak_bytes <= 128


def test_bit_identical_with_lr_scheduler_and_param_groups():
    ref, ref_opt, model, opt = twins(Pager(200, page_bytes=40, device="cpu"), groups=lambda m: [
        {"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 3e-2}])
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[2e-2, 5e-2], total_steps=50)
              for o in (ref_opt, opt)]
    train_both([(ref, ref_opt), (model, opt)], range(50),
               between=lambda step: [s.step() for s in scheds])
    assert opt.param_groups[1]["lr"] == ref_opt.param_groups[1]["lr"] != 3e-2
    assert opt.pager.page_outs > 0


@pytest.mark.parametrize("dtype, kwargs", [(torch.bfloat16, dict(fp32_state=False)),
                                           (torch.float16, dict(fp32_state=False)),
                                           (torch.float64, {})])
def test_bit_identical_in_other_dtypes(dtype, kwargs):
    """float64: always; 16-bit parameters with fp32_state=False (state in their own dtype, as
    torch keeps it)."""
    ref, ref_opt, model, opt = twins(Pager(256, page_bytes=64, device="cpu"), dtype, **kwargs)
    train_both([(ref, ref_opt), (model, opt)], range(20), dtype)


def test_non_contiguous_parameter():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5).t())        # (5, 7), not contiguous
    b = torch.nn.Parameter(a.detach().clone().t().contiguous().t())
    assert not b.is_contiguous()
    ref_opt = torch.optim.AdamW([a], foreach=False, **HYPER)
    opt = PagedAdamW([b], pager=Pager(64, page_bytes=32, device="cpu"), **HYPER)
    for step in range(10):
        g = torch.randn(5, 7)
        a.grad, b.grad = g.clone(), g.clone()
        ref_opt.step(), opt.step()
        assert torch.equal(a, b)


def test_state_dict_saved_while_evicted_continues_bit_identically():
    """Saved while a spike has every page out: reads them where they are, pages nothing in,
    equals torch's state_dict, and loads into a fresh PagedAdamW and into torch's AdamW."""
    pager = Pager(256, page_bytes=64, device="cpu")
    ref, ref_opt, model, opt = twins(pager)
    train_both([(ref, ref_opt), (model, opt)], range(25))
    pager.reserve(256)
    counters = pager.stats()
    assert counters["resident_bytes"] == 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    assert pager.stats() == counters, "saving must not page anything in"
    ref_sd, sd = ref_opt.state_dict(), opt.state_dict()
    for i, s in ref_sd["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], sd["state"][i][key]), (i, key)
    buffer.seek(0)
    fresh = PagedAdamW(model.parameters(), pager=Pager(192, page_bytes=64, device="cpu"), **HYPER)
    fresh.load_state_dict(torch.load(buffer))
    with pytest.raises(ValueError, match="size"):   # another model's state: nothing is lost
        fresh.load_state_dict(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict())
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), foreach=False, **HYPER)
    twin_opt.load_state_dict(sd)
    train_both([(ref, ref_opt), (model, fresh), (twin, twin_opt)], range(25, 50))
    assert fresh.pager.page_outs > 0
    snapshot = fresh.state_dict()
    saved = {k: v.clone() for k, v in snapshot["state"][0].items()}
    train_step(model, fresh, 50)
    assert all(torch.equal(v, snapshot["state"][0][k]) for k, v in saved.items()), "a copy"


def test_step_prefetches_the_next_page_pair_across_parameters():
    """Weight (6,) and bias (2,), 8-byte pages: m and v are 3 + 1 pages each. After a spike
    has evicted them all, each `use` pages in its pair and prefetches the next one, also the
    bias's first pair while the weight's last one updates; only the first pair is left to `use`."""
    class Recording(Pager):
        def prefetch(self, pids):
            before = self.page_ins
            super().prefetch(pids)
            self.log.append((list(pids), self.page_ins - before))
    pager = Recording(64, page_bytes=8, device="cpu")
    pager.log = []
    w, b = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.ones(6), torch.ones(2)
    opt = PagedAdamW([w, b], pager=pager)
    opt.step()
    (wm, wv), (bm, bv) = [(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in (w, b)]
    pager.reserve(64)
    pager.release(64)
    pager.log, ins = [], pager.page_ins
    opt.step()
    assert [e for e in pager.log if e[0]] == [([wm[1], wv[1]], 2), ([wm[2], wv[2]], 2),
                                              ([bm[0], bv[0]], 2)]
    assert pager.page_ins - ins == 8


def test_loads_torch_adamw_state_dict_and_back():
    ref, ref_opt, model, opt = twins(Pager(300, page_bytes=80, device="cpu"))
    train_both([(ref, ref_opt)], range(5))
    model.load_state_dict(ref.state_dict())
    opt.load_state_dict(ref_opt.state_dict())
    back = torch.optim.AdamW(small_model(1).parameters(), foreach=False, **HYPER)
    back.load_state_dict(opt.state_dict())
    for i, s in ref_opt.state_dict()["state"].items():
        assert all(torch.equal(s[k], back.state_dict()["state"][i][k]) for k in s), i
    train_both([(ref, ref_opt), (model, opt)], range(5, 15))


def test_closure_zero_grad_and_params_without_grad():
    model = small_model()
    model[2].bias.requires_grad_(False)
    opt = PagedAdamW(model.parameters())
    x, y = torch.randn(4, 9), torch.randn(4, 4)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert loss.item() > 0 and len(opt.state) == 3 and model[2].bias not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_needs_room_for_two_pages():
    """A step holds one page of m and one of v at once: a budget of 1.5 pages cannot train."""
    w = torch.nn.Parameter(torch.ones(100))
    w.grad = torch.ones(100)
    opt = PagedAdamW([w], pager=Pager(60, page_bytes=40, device="cpu"))
    with pytest.raises(OutOfBudget, match=r"\(80 bytes\) must fit on the device together, but "
                                          r"the budget is 60 bytes with 0 reserved"):
        opt.step()
    assert torch.equal(w, torch.ones(100))


def test_step_that_cannot_fit_changes_nothing():
    """A spike that leaves no room for a page of m plus one of v: step raises before touching
    any parameter or step count; after release, training continues exactly like torch's."""
    pager = Pager(256, page_bytes=64, device="cpu")
    ref, ref_opt, model, opt = twins(pager)
    train_both([(ref, ref_opt), (model, opt)], range(1))
    before = [p.detach().clone() for p in model.parameters()]
    pager.reserve(160)                                   # 96 bytes left < 2 pages of 64
    with pytest.raises(OutOfBudget, match=r"\(128 bytes\) must fit .* budget is 256 bytes with "
                                          r"160 reserved; nothing was updated"):
        train_step(model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(s["step"].item() == 1 for s in opt.state.values())
    pager.release(160)
    train_both([(ref, ref_opt), (model, opt)], range(1, 6))


def test_state_allocation_is_all_or_nothing():
    w = torch.nn.Parameter(torch.ones(10))
    w.grad = torch.ones(10)
    pager = Pager(60, page_bytes=40, device="cpu", evict=False)   # m fits (40), v does not
    opt = PagedAdamW([w], pager=pager)
    with pytest.raises(OutOfBudget, match="alloc of 40 bytes"):
        opt.step()
    assert w not in opt.state and pager.resident_bytes == 0
    assert opt.state_dict()["state"] == {}
    assert torch.equal(w, torch.ones(10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(lr=float("nan")), "lr must be >= 0, got nan"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\] must be >= 0 and < 1, got 1.0"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_device_mismatch_and_complex_parameters():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="a parameter is on cpu but the pager's device is meta"):
        PagedAdamW([w], pager=Pager(None, device="meta")).step()
    z = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    z.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="real floating point, got torch.complex64"):
        PagedAdamW([z]).step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_paging_to_pinned_host_memory_is_bit_identical():
    """The real thing: pages move between GPU memory and pinned host memory, prefetch on a side
    stream."""
    pager = Pager(1024, page_bytes=64, device="cuda")
    ref, ref_opt, model, opt = twins(pager)
    ref.cuda(), model.cuda()   # before the first step: the state is made on the params' device
    for step in range(50):
        for m, o in ((ref, ref_opt), (model, opt)):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 9, generator=g).cuda(), torch.randn(16, 4, generator=g).cuda()
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        pager.reserve(1024)
        assert not pager.on_device and all(page.is_pinned() for page in pager.on_host.values())
        pager.release(1024)
        assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert pager.page_outs > 0 and pager.page_ins > 0
    assert all(page.is_cuda for page in pager.on_device.values())


def everything(opt):
    """What a failed load must leave as it was: the state_dict, pages and counters."""
    sd = opt.state_dict()
    pager = opt.pager
    return (sd, pager.stats(), list(pager.on_device), sorted(pager.on_host),
            [(k, dict(g, params=None)) for k, g in enumerate(opt.param_groups)])


def assert_same(a, b):
    (sd_a, *rest_a), (sd_b, *rest_b) = a, b
    assert rest_a == rest_b
    assert sd_a["param_groups"] == sd_b["param_groups"] and sd_a["state"].keys() == sd_b["state"].keys()
    for i, s in sd_a["state"].items():
        assert all(torch.equal(s[k], sd_b["state"][i][k]) for k in s), i


def trained_twins(budget=600):
    pager = Pager(budget, page_bytes=64, device="cpu")
    ref, ref_opt, model, opt = twins(pager)
    train_both([(ref, ref_opt), (model, opt)], range(5))
    return ref, ref_opt, model, opt


def test_a_load_that_does_not_fit_changes_nothing():
    """Item 4 (issue 10): with the budget reserved, load_state_dict raised OutOfBudget after
    the old pages were freed, and the optimizer could neither save nor step again. Now nothing
    changes, and training continues bit-identically once the spike is over."""
    ref, ref_opt, model, opt = trained_twins()
    opt.pager.reserve(opt.pager.budget - 32)            # a spike: every page out, no room for one
    before = everything(opt)
    with pytest.raises(OutOfBudget):
        opt.load_state_dict(ref_opt.state_dict())
    assert_same(everything(opt), before)
    opt.pager.release(opt.pager.reserved_bytes)
    train_both([(ref, ref_opt), (model, opt)], range(5, 10))


def test_a_load_failing_at_any_point_changes_nothing(monkeypatch):
    """Fail the k-th call of each pager method the load makes (free, alloc), and the check of
    the last parameter's state: each time the optimizer and its pager are as they were."""
    ref, ref_opt, model, opt = trained_twins()
    sd = ref_opt.state_dict()
    failures = []
    for method in ("free", "alloc"):
        for k in range(8):
            calls, real = [0], getattr(Pager, method)

            def failing(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == k + 1:
                    raise RuntimeError("injected")
                return real(self, *args, **kwargs)
            monkeypatch.setattr(Pager, method, failing)
            before = everything(opt)
            try:
                opt.load_state_dict(sd)
            except RuntimeError as e:
                assert str(e) == "injected"
                failures.append((method, k))
                assert_same(everything(opt), before)
            monkeypatch.setattr(Pager, method, real)
    assert ("free", 3) in failures and ("alloc", 7) in failures   # 4 parameters, 2 moments each
    bad = copy.deepcopy(sd)
    bad["state"][3]["exp_avg"] = torch.zeros(5)                    # the last one: (4,) expected
    before = everything(opt)
    with pytest.raises(ValueError, match=r"parameter 3: exp_avg is \(5,\)"):
        opt.load_state_dict(bad)
    assert_same(everything(opt), before)
    opt.load_state_dict(sd)                                         # and a good load still works
    train_both([(ref, ref_opt), (model, opt)], range(5, 10))


@pytest.mark.parametrize("is_paged", [True, False])
def test_state_of_another_size_is_refused(is_paged):
    """Item 7 (issue 10): torch AdamW's state for a 3-element parameter loaded into a 4-element
    one; element 3 then never trained. torch refuses; so does PagedAdamW, changing nothing."""
    p3, p4 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    p3.grad, p4.grad = torch.ones(3), torch.ones(4)
    torch_opt = torch.optim.AdamW([p3])
    torch_opt.step()
    opt = PagedAdamW([p4], is_paged=is_paged)
    opt.step()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"parameter 0: exp_avg is \(3,\) torch.float32, but the "
                                         r"parameter is a \(4,\) floating-point tensor"):
        opt.load_state_dict(torch_opt.state_dict())
    after = opt.state_dict()
    assert all(torch.equal(before["state"][0][k], after["state"][0][k]) for k in before["state"][0])
    sd = torch_opt.state_dict()
    del sd["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"lacks \['exp_avg_sq'\]"):
        PagedAdamW([p3]).load_state_dict(sd)


@pytest.mark.parametrize("is_paged", [True, False])
def test_maximize_is_bit_identical_to_torch(is_paged):
    """Item 8 (issue 10): maximize was shown in param_groups and ignored by the update."""
    pager = Pager(300, page_bytes=64, device="cpu") if is_paged else None
    ref, ref_opt, model, opt = twins(pager, is_paged=is_paged, maximize=True)
    ref_opt.param_groups[0]["maximize"] = True
    train_both([(ref, ref_opt), (model, opt)], range(10))
    # and from a torch checkpoint that says maximize=True
    ref2, ref_opt2, model2, opt2 = twins(pager and Pager(300, page_bytes=64, device="cpu"),
                                         is_paged=is_paged)
    ref_opt2.param_groups[0]["maximize"] = True
    train_both([(ref2, ref_opt2)], range(3))
    model2.load_state_dict(ref2.state_dict())
    opt2.load_state_dict(ref_opt2.state_dict())
    train_both([(ref2, ref_opt2), (model2, opt2)], range(3, 8))


@pytest.mark.parametrize("flag, value", [("amsgrad", True), ("fused", True), ("capturable", True),
                                         ("differentiable", True)])
def test_options_not_implemented_are_refused(flag, value):
    """Item 8: refused at construction (argument or group), add_param_group, load_state_dict
    (torch's checkpoint) and step (a group edited afterwards), never silently ignored."""
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    match = rf"{flag}=True is not implemented"
    if flag == "amsgrad":
        with pytest.raises(ValueError, match=match):
            PagedAdamW([w], amsgrad=True)
    with pytest.raises(ValueError, match=match):
        PagedAdamW([{"params": [w], flag: value}])
    opt = PagedAdamW([w])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], flag: value})
    assert len(opt.param_groups) == 1
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    torch_opt.param_groups[0][flag] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0][flag] in (False, None) if flag in opt.param_groups[0] else True
    opt.param_groups[0][flag] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(w, torch.ones(3))


def test_adam_l2_checkpoint_is_refused():
    """torch.optim.Adam's groups say decoupled_weight_decay=False: with weight decay that is
    another update (L2 in the gradient), so its checkpoint is refused; without, it loads."""
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        PagedAdamW([w]).load_state_dict(torch.optim.Adam([w], weight_decay=0.1).state_dict())
    PagedAdamW([w]).load_state_dict(torch.optim.Adam([w]).state_dict())


def float32_reference(p16, grads, **hyper):
    """What float32 state means: torch's AdamW on a float32 copy of the 16-bit parameter,
    re-read from the parameter before each step and rounded back into it after."""
    work = torch.nn.Parameter(p16.detach().float())
    opt = torch.optim.AdamW([work], foreach=False, **hyper)
    out = p16.detach().clone()
    for g in grads:
        work.data.copy_(out.float())
        work.grad = g.float()
        opt.step()
        out = work.detach().to(p16.dtype)
    return out, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_paged", [True, False])
def test_low_precision_parameters_keep_float32_state(dtype, is_paged):
    """Item 15 (issue 10): float16 parameters (randn * 0.1, gradients randn * 0.01): in float16,
    v = 0.001 * g^2 underflows and the first step wrote inf (as torch's AdamW does in float16).
    By default the state is float32 and the update equals the float32 reference bit for bit;
    the state_dict still loads into torch's AdamW, and torch's state loads back."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(1024, 32, generator=g) * 0.1).to(dtype))
    grads = [(torch.randn(1024, 32, generator=g) * 0.01).to(dtype) for _ in range(5)]
    if dtype == torch.float16:                       # the failure, as torch's AdamW shows it
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = grads[0]
        torch.optim.AdamW([q], foreach=False).step()
        assert not torch.isfinite(q).all()
    want, ref_opt = float32_reference(p, grads)
    pager = Pager(40_000, page_bytes=4096, device="cpu") if is_paged else None
    opt = PagedAdamW([p], pager=pager, is_paged=is_paged)
    for grad in grads:
        p.grad = grad
        opt.step()
    assert p.dtype == dtype and torch.isfinite(p).all() and torch.equal(p, want)
    sd = opt.state_dict()
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    assert torch.equal(sd["state"][0]["exp_avg_sq"], ref_opt.state[ref_opt.param_groups[0]
                                                                    ["params"][0]]["exp_avg_sq"])
    back = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())])
    back.load_state_dict(sd)                          # torch casts to the parameter's dtype
    assert back.state_dict()["state"][0]["exp_avg"].dtype == dtype
    fresh = PagedAdamW([p], is_paged=is_paged)
    fresh.load_state_dict(sd)                         # float32 state stays float32
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"])
