"""Measure every training-dependent number that a test or lesson 09 asserts, over the grid of
seeds x PyTorch CPU kernel paths, so that the bounds in tests/test_toy.py, tests/test_finetune.py
and lesson 09 can be checked (and their docstrings updated) after a change to the toy model or
its training.

    python tools/training_grid.py                      # seeds 0-4, paths default and avx2 (+avx512)
    python tools/training_grid.py --seeds 0 1 --paths default

Each kernel path runs in its own process (ATEN_CPU_CAPABILITY is read when torch starts), two at
a time; about 1.5 minutes per seed and path on an idle 2-core CPU. `--cache DIR` keeps each
pretrained base (per path and seed; pretraining is deterministic there) to skip pretraining on a
rerun. One JSON line per run, then the range of each number over the grid. What the numbers are
(the asserts they feed):

    add_acc, sub_acc     pretrain(seed) on held-out addition / subtraction (>= 0.95, < 0.05)
    rel_err, q_acc_drop  NF4 q_proj's relative weight error; accuracy lost by quantizing (lesson 09)
    acc_<method>         held-out exact match after finetune's defaults (lesson 09, test_finetune)
    acc_min, l16-q       the lowest of the five; lora16's accuracy minus qlora's
    learn                max over methods of final / start held-out loss
    order                weight error NF4 < int4 < FP4
    q/l16, q/min         qlora / lora16 loss; qlora / min(FP4, int4) loss
    ex2_maxdiff          exercise 2: largest change of the addition loss by quantizing
"""
import argparse
import copy
import json
import os
import subprocess
import sys


def run(seeds, cache=None):
    import torch

    import minqlora as mq
    from minqlora import toy
    from minqlora.finetune import METHODS, finetune
    from minqlora.training import evaluate
    for s in seeds:
        r = dict(path=os.environ.get("ATEN_CPU_CAPABILITY", "(picked)"), seed=s)
        file = cache and os.path.join(cache, f"base_{r['path']}_{s}.pt")
        if file and os.path.exists(file):
            base = toy.ToyLM()
            base.load_state_dict(torch.load(file))
            base.eval()
        else:
            base = toy.pretrain(s)
            if file:
                torch.save(base.state_dict(), file)
        add, sub = toy.make_data("add", s)["heldout"], toy.make_data("sub", s)["heldout"]
        add_loss, add_acc = evaluate(base, add)
        r.update(add_acc=add_acc, sub_acc=evaluate(base, sub)[1])
        qm = mq.prepare_qlora(copy.deepcopy(base), r=8, alpha=16, dropout=0.0,
                              compute_dtype=torch.float32)
        w = base.layers[0].q_proj.weight
        w_hat = qm.layers[0].q_proj.base.dequantize(torch.float32)
        r.update(rel_err=((w_hat - w).norm() / w.norm()).item(),
                 q_acc_drop=add_acc - evaluate(qm, add)[1])
        res = {m: finetune(base, m, eval_every=20, seed=s) for m in METHODS}
        loss = {m: x.heldout_loss for m, x in res.items()}
        err = {m: x.weight_error for m, x in res.items()}
        start = {m: x.heldout_curve[0][1] for m, x in res.items()}
        four = ["qlora", "qlora-int4", "qlora-fp4"]
        r.update({f"acc_{m}": x.accuracy for m, x in res.items()})
        r["acc_min"] = min(x.accuracy for x in res.values())
        r["l16-q"] = res["lora16"].accuracy - res["qlora"].accuracy
        r["learn"] = max(loss[m] / start[m] for m in METHODS)
        r["order"] = sorted(four, key=err.get) == four
        r["int4/nf4"] = err["qlora-int4"] / err["qlora"]
        r["fp4/int4"] = err["qlora-fp4"] / err["qlora-int4"]
        r["q/l16"] = loss["qlora"] / loss["lora16"]
        r["q/min"] = loss["qlora"] / min(loss["qlora-fp4"], loss["qlora-int4"])
        losses = [evaluate(mq.prepare_qlora(copy.deepcopy(base), r=8, dropout=0.0, quant_type=qt,
                                            compute_dtype=torch.float32), add)[0]
                  for qt in ("nf4", "fp4", "int4")]
        r["ex2_maxdiff"] = max(abs(v - add_loss) for v in losses)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--paths", nargs="+", default=None)
    ap.add_argument("--cache", default=None, help="a folder that keeps the pretrained bases")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run(args.seeds, args.cache)
    if args.paths is None:
        import torch
        args.paths = ["default", "avx2"] + (
            ["avx512"] if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else [])
    rows, procs = [], []
    for i, path in enumerate(args.paths):
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--seeds", *map(str, args.seeds)]
            + (["--cache", args.cache] if args.cache else []),
            env=dict(os.environ, ATEN_CPU_CAPABILITY=path), stdout=subprocess.PIPE, text=True))
        if len(procs) == 2 or i == len(args.paths) - 1:
            for p in procs:
                for line in p.stdout:
                    print(line, end="", flush=True)
                    rows.append(json.loads(line))
                p.wait()
            procs = []
    print("\nrange over the grid:")
    for key in rows[0]:
        if key not in ("path", "seed"):
            values = [r[key] for r in rows]
            print(f"  {key:<12} {min(values)} .. {max(values)}")


if __name__ == "__main__":
    main()
