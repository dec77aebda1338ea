"""FSDP2 over QLoRA (distributed.py): the toy fine-tuned on 2 CPU processes under torchrun (gloo)
against one process, and ShardableLinear4bit against Linear4bit in one process."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minqlora import memory, toy
from minqlora.distributed import (ShardableLinear4bit, fsdp_blocks, held_bytes, shard_rows,
                                  shardable)
from minqlora.linear4bit import Linear4bit
from minqlora.qlora import prepare_qlora, trainable_summary

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "lessons" / "fsdp_qlora.py"
STEPS = 6


def torchrun(nproc: int, save: Path, *args) -> dict:
    """lessons/fsdp_qlora.py on `nproc` ranks; rank 0's JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(SCRIPT), "--steps", str(STEPS), "--save", str(save),
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
    assert done.returncode == 0, "\n".join(ranks[-40:]) + done.stderr[-1500:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_process(save: Path) -> dict:
    spec = importlib.util.spec_from_file_location("fsdp_qlora", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.run(steps=STEPS, save=save)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    one, two = folder / "one.pt", folder / "two.pt"
    return one_process(one), torch.load(one), torchrun(2, two), torch.load(two)


def test_two_ranks_train_like_one_process(runs):
    one, _, two, _ = runs
    assert two["world"] == 2 and len(two["losses"]) == len(one["losses"]) == STEPS
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)   # float32 rounding only
    assert one["losses"][-1] < 0.8 * one["losses"][0]                # and it learns


def test_each_rank_holds_half_of_the_4bit_weights(runs):
    """Sharded: the packed bytes and absmaxes, adapters, gradients, PagedAdamW's state; the
    code tables, absmax2 and offset stay whole on each rank."""
    (whole,), ranks = runs[0]["bytes"], runs[2]["bytes"]
    four_bit = whole["4bit_sharded"] + whole["4bit_replicated"]
    for held in ranks:
        assert (held["4bit_sharded"] + held["4bit_replicated"]) / four_bit <= 0.6
        assert held["4bit_replicated"] == whole["4bit_replicated"] < 0.05 * four_bit
        for kind in ("4bit_sharded", "adapters", "gradients", "optimizer", "other"):
            assert held[kind] == whole[kind] // 2, kind


def test_gathered_state_dict_is_the_single_process_one(runs):
    """Same keys in bitsandbytes' layout; the 4-bit tensors bit for bit, the trained adapters
    to float32 rounding; it loads into a plain (unsharded) QLoRA toy."""
    _, one, _, two = runs
    assert list(two) == list(one)
    for k, v in one.items():
        assert two[k].dtype == v.dtype and two[k].shape == v.shape, k
        if "lora_" in k:
            torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(two[k], v), k
    assert one["layers.0.q_proj.base.weight"].shape == (64 * 64 // 2, 1)    # bnb: (n/2, 1)
    model = prepare_qlora(toy.ToyLM(), r=8, dropout=0.0)
    model.load_state_dict(two)
    assert torch.equal(model.layers[1].down_proj.base.weight_packed,
                       two["layers.1.down_proj.base.weight"].reshape(-1))


def test_per_gpu_estimate_is_the_bytes_each_rank_held(runs):
    """memory.estimate(gpus=2) on the toy's shapes (float32 everywhere but the 4-bit layers,
    r = 8 on all 14 linears) == what each rank held after training, part by part."""
    e = memory.estimate(toy.CONFIG, "qlora", r=8, gpus=2, weight_bits=32, adapter_bits=32,
                        grad_bits=32, batch_size=0)
    for held in runs[2]["bytes"]:
        assert e.weights + e.quant_constants == (held["4bit_sharded"] + held["4bit_replicated"]
                                                 + held["other"])
        assert e.replicated == held["4bit_replicated"]
        assert (e.adapters, e.gradients, e.optimizer) == (
            held["adapters"], held["gradients"], held["optimizer"])
    whole = memory.estimate(toy.CONFIG, "qlora", r=8, weight_bits=32, adapter_bits=32)
    assert e.gathered > 0 and whole.gathered == whole.replicated == 0


def test_per_gpu_estimates_for_the_readme():
    """2 x 24 GB: LLaMA-2-70B and LLaMA-65B fit with r = 8 adapters, not with r = 64; the
    sharded parts halve, the activations do not."""
    for name in ("llama-2-70b", "llama-65b"):
        one, two = memory.estimate(name, "qlora", r=8), memory.estimate(name, "qlora", r=8, gpus=2)
        assert two.total < 24e9 < one.total
        assert memory.estimate(name, "qlora", gpus=2).total > 24e9
        assert two.weights == -(-one.weights // 2) and two.activations == one.activations
        assert 0 < two.replicated < 1e-3 * two.total            # tables, absmax2, offsets


def test_shard_rows_are_torch_chunks():
    """FSDP2's rule (checked on its real shards inside lessons/fsdp_qlora.py): torch.chunk,
    and an empty shard for each rank chunk leaves out."""
    for rows in range(0, 40):
        for world in range(1, 9):
            chunks = list(torch.arange(rows).chunk(world)) if rows else []
            for rank in range(world):
                start, stop = shard_rows(rows, world, rank)
                want = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, stop)) == want, (rows, world, rank)


def shardable_twin(double_quant=True):
    torch.manual_seed(0)
    plain = Linear4bit.from_linear(nn.Linear(128, 64), double_quant=double_quant,
                                   compute_dtype=torch.float32)
    twin = Linear4bit.from_linear(nn.Linear(128, 64), double_quant=double_quant,
                                  compute_dtype=torch.float32)
    twin.load_state_dict(plain.state_dict())
    return plain, shardable(nn.Sequential(twin))[0]


@pytest.mark.parametrize("double_quant", [True, False])
def test_shardable_layer_is_the_same_layer(double_quant):
    """Frozen uint8 / float32 parameters instead of buffers: same output, gradient, state_dict;
    a load keeps them parameters; .half() rounds neither the bytes nor the float32 absmax."""
    plain, layer = shardable_twin(double_quant)
    assert isinstance(layer, ShardableLinear4bit)
    per_block = "qabsmax" if double_quant else "absmax"
    params = dict(layer.named_parameters())
    assert set(params) == {"weight_packed", per_block, "bias"}
    assert not params["weight_packed"].requires_grad and not params[per_block].requires_grad
    assert per_block not in dict(layer.named_buffers())
    x = torch.randn(3, 128, requires_grad=True)
    y = torch.randn(3, 128, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    plain(x).square().sum().backward()
    layer(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad) and torch.equal(plain.bias.grad, layer.bias.grad)
    sd = layer.state_dict()
    assert list(sd) == list(plain.state_dict())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in sd.items())
    layer.load_state_dict(plain.state_dict())
    assert isinstance(layer._parameters["weight_packed"], nn.Parameter)
    layer.half()
    assert layer.weight_packed.dtype == torch.uint8 and isinstance(layer.weight_packed,
                                                                   nn.Parameter)
    assert getattr(layer, per_block).dtype == getattr(plain, per_block).dtype
    with pytest.raises(RuntimeError):
        layer.load_state_dict({"weight": torch.zeros(3, 1, dtype=torch.uint8)})
    assert isinstance(layer._parameters[per_block], nn.Parameter)


def test_a_subclass_of_linear4bit_is_refused():
    class Mine(Linear4bit):
        pass
    with pytest.raises(TypeError, match="Mine subclasses Linear4bit"):
        shardable(nn.Sequential(Mine(64, 64)))


def test_blocks_and_bytes_of_an_unsharded_model():
    """The blocks are the repeated layers; held_bytes counts as trainable_summary does."""
    model = prepare_qlora(toy.ToyLM(), r=8)
    assert fsdp_blocks(model) == list(model.layers)
    before = trainable_summary(model)
    held, summary = held_bytes(shardable(model)), trainable_summary(model)
    assert summary == before
    assert held["4bit_sharded"] + held["4bit_replicated"] == summary.bytes_4bit
    assert (held["adapters"], held["other"]) == (summary.bytes_adapters, summary.bytes_other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_ranks_with_nccl_train_like_one_cpu_process(tmp_path):
    """NCCL, one GPU per rank (2 when there are 2, else FSDP over 1)."""
    nproc = min(2, torch.cuda.device_count())
    gpu = torchrun(nproc, tmp_path / "gpu.pt", "--device", "cuda")
    cpu = one_process(tmp_path / "cpu.pt")
    assert gpu["losses"] == pytest.approx(cpu["losses"], rel=1e-3)
    for held in gpu["bytes"]:
        assert held["4bit_sharded"] == cpu["bytes"][0]["4bit_sharded"] // nproc


@pytest.fixture
def one_rank(tmp_path):
    """A process group of one rank in this process (gloo), and its device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp_gathers_the_bytes_for_forward_and_backward_and_never_casts_them(one_rank):
    """Inside a block's forward and backward the 4-bit layer sees its whole uint8 bytes, between
    them the sharded DTensor (FSDP freed the whole copy); a bf16 MixedPrecisionPolicy casts the
    adapters, not the bytes; the output is the unsharded model's (to bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from minqlora.distributed import shard_qlora
    torch.manual_seed(0)
    model = prepare_qlora(toy.ToyLM(), r=8, dropout=0.0, compute_dtype=torch.float32)
    ids = toy.make_data("sub")["train"][:4, :-1]
    want = model(ids)
    base, seen = model.layers[1].q_proj.base, []        # layer 0's input needs no gradient
    record = lambda what: lambda m, *_: seen.append(  # noqa: E731
        (what, type(m.weight_packed).__name__, m.weight_packed.dtype, m.weight_packed.numel()))
    base.register_forward_pre_hook(record("forward"))
    base.register_full_backward_pre_hook(record("backward"))
    shard_qlora(model, mesh=one_rank, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    out = model(ids)
    between = isinstance(base.weight_packed, DTensor)
    out.float().square().mean().backward()
    assert seen == [("forward", "Parameter", torch.uint8, 2048),
                    ("backward", "Parameter", torch.uint8, 2048)]
    assert between and isinstance(base.weight_packed, DTensor)
    assert model.layers[0].q_proj.lora_B.weight.grad is not None
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)


def test_gathered_bytes_are_the_root_and_one_block_at_a_time(one_rank):
    """Inside block 1's forward the whole (non-DTensor) parameters are the root's (embedding,
    final norm, lm_head, kept since the root's forward began) and block 1's own. On a GPU FSDP
    also prefetches the next block: estimate(gpus=N).gathered counts root + 2 blocks."""
    from torch.distributed.tensor import DTensor

    from minqlora.distributed import shard_qlora
    model = prepare_qlora(toy.ToyLM(), r=8, dropout=0.0, compute_dtype=torch.float32)
    root = sum(p.nbytes for m in (model.embed_tokens, model.norm, model.lm_head)
               for p in m.parameters())
    whole = []
    model.layers[1].q_proj.register_forward_pre_hook(lambda *_: whole.append(sum(
        p.nbytes for p in model.parameters() if not isinstance(p, DTensor))))
    shard_qlora(model, mesh=one_rank)
    model(toy.make_data("sub")["train"][:4, :-1])
    e = memory.estimate(toy.CONFIG, "qlora", r=8, gpus=2, weight_bits=32, adapter_bits=32)
    block = whole[0] - root
    assert block > 0 and e.gathered == root + 2 * block
