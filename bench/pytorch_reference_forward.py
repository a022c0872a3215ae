#!/usr/bin/python3
"""Forward time of a PyTorch implementation of modscope-bench's reference shape, on this machine, now.

The reference forward's targets (docs/PERFORMANCE.md) are set against a PyTorch implementation of the
reference shape (6 layers, d 192, 3 heads, SwiGLU 512, vocabulary 2048, capacity 0.125 on layers 1/3/5,
batch 1, random weights). A virtual machine's speed drifts, so this script times such an implementation in
the same minutes as modscope-bench's reference section, and the two can be compared.
The blocks are bench/pytorch_prototype_training.py's (docs/MODEL.md, no code shared with the engine); the
forward is top-k routing under torch.inference_mode(), logits for every position, as modscope-bench's.

Usage: /usr/bin/python3 bench/pytorch_reference_forward.py [--reps 60] [--threads 1]
Prints one JSON object: median and p10/p90 ms for MoD and dense at T = 128, 512, 2048.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import pytorch_prototype_training as proto

MAX_T = 2048


def forward(model, ids):
    x = model.emb(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    for blk in model.blocks:
        if not blk.routed:
            x = x + blk.delta(x, pos, model.cos, model.sin)
            continue
        r = blk.router(x).squeeze(-1)  # [1, T]
        k = max(1, math.ceil(proto.CAPACITY * x.shape[1] - 1e-9))
        idx = r.topk(k, dim=1).indices.sort(1).values  # [1, k]
        gidx = idx.unsqueeze(-1).expand(-1, -1, proto.D)
        xs = x.gather(1, gidx)
        upd = xs + torch.sigmoid(r.gather(1, idx)).unsqueeze(-1) * blk.delta(xs, pos.gather(1, idx), model.cos,
                                                                             model.sin)
        x = x.scatter(1, gidx, upd)
    return F.linear(model.norm(x), model.emb.weight)


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1234)
    models = {"mod": proto.Model(dense=False), "dense": proto.Model(dense=True)}
    for m in models.values():
        m.cos, m.sin = proto.rope_tables(proto.D // proto.H, MAX_T)
        m.eval()
    out = {"torch": torch.__version__, "threads": args.threads}
    with torch.inference_mode():
        for T in (128, 512, 2048):
            ids = torch.randint(0, proto.V, (1, T))
            reps = args.reps if T < 2048 else max(5, args.reps // 4)
            times = {name: [] for name in models}
            for rep in range(3 + reps):  # MoD and dense in turn, as modscope-bench does
                for name, m in models.items():
                    t0 = time.perf_counter()
                    forward(m, ids)
                    if rep >= 3:
                        times[name].append(1e3 * (time.perf_counter() - t0))
            out[str(T)] = {name: {"median_ms": round(statistics.median(v), 3), "p10_ms": round(percentile(v, 0.1), 3),
                                  "p90_ms": round(percentile(v, 0.9), 3)} for name, v in times.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
