"""QLoRA fine-tuning of the toy model, sharded with FSDP2 over the ranks torchrun starts
(lesson 13). Each rank takes its share of every batch; the 4-bit weights, the adapters, their
gradients and PagedAdamW's state are split across ranks.

    torchrun --nproc_per_node 2 lessons/fsdp_qlora.py --steps 8     # 2 CPU processes (gloo)
    python lessons/fsdp_qlora.py --steps 8                           # one process, no FSDP

Under torchrun the model is sharded (shard_qlora), even on one rank; --device cuda uses NCCL,
one GPU per rank. Rank 0 prints one JSON line: the losses (the ranks' mean, one per step) and,
per rank, the bytes it holds after training (4-bit sharded / replicated, adapters, other,
gradients, optimizer). --save FILE also writes the full state_dict gathered from the shards.
"""
import argparse
import gc
import json
import os

import torch
import torch.distributed as dist

from minqlora import distributed, toy
from minqlora.paged_adam import PagedAdamW
from minqlora.pager import Pager
from minqlora.qlora import prepare_qlora
from minqlora.training import answer_loss, one_thread


def run(steps: int = 8, batch_size: int = 64, seed: int = 0, device: str = "cpu", save=None):
    """Train; returns (on rank 0) {"world", "losses", "bytes": one dict per rank}."""
    sharded = "WORLD_SIZE" in os.environ                  # started by torchrun
    if device == "cuda":                                  # one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    if sharded:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    torch.manual_seed(seed)                           # the same base and adapters on every rank
    model = prepare_qlora(toy.ToyLM(), r=8, alpha=16, dropout=0.0,
                          compute_dtype=torch.float32).to(device)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        distributed.shard_qlora(model, mesh=init_device_mesh(device.split(":")[0], (world,)))
        for p in model.parameters():                  # my shard: the rows shard_rows names
            start, stop = distributed.shard_rows(p.shape[0], world, rank)
            assert torch.equal(distributed.local(p), p.full_tensor()[start:stop])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = distributed.on_shards(PagedAdamW, params, lr=5e-3, weight_decay=0.0,
                                pager=Pager(None, device=device))
    data = toy.make_data("sub", seed)["train"].to(device)
    gen, losses = torch.Generator().manual_seed(seed), []
    with one_thread():
        for _ in range(steps):
            batch = data[torch.randint(len(data), (batch_size,), generator=gen)]  # (64, 9)
            loss, _ = answer_loss(model.train(), batch.chunk(world)[rank])        # my share
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss = loss.detach()
            if sharded:
                dist.all_reduce(loss)                  # sum of the ranks' means -> their mean
            losses.append(loss.item() / world)
    held = distributed.held_bytes(model)
    held["gradients"] = sum(distributed.local(p.grad).nbytes for p in params)
    held["optimizer"] = opt.pager.resident_bytes
    per_rank = [held] * world
    if sharded:
        dist.all_gather_object(per_rank, held)
    state = {k: v.cpu() for k, v in distributed.full_state_dict(model).items()}
    if rank == 0 and save:
        torch.save(state, save)
    if sharded:
        # FSDP's hooks make cycles through the model to the process group; collected only at
        # interpreter exit, gloo's threads would be torn down with Python half gone (SIGABRT).
        del model, opt, params
        gc.collect()
        dist.barrier()                                 # no rank leaves while another still talks
        dist.destroy_process_group()
    return {"world": world, "losses": losses, "bytes": per_rank} if rank == 0 else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--save", default=None)
    a = parser.parse_args()
    result = run(a.steps, a.batch_size, a.seed, a.device, a.save)
    if result is not None:
        print(json.dumps(result))
