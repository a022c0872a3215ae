#!/usr/bin/python3
"""Training throughput of a PyTorch implementation of the bundled model's shape, on this machine, now.

The training target (8.8k tokens/s MoD, 5.3k dense; docs/PERFORMANCE.md) comes from a PyTorch prototype. A
virtual machine's speed drifts, so the C++ trainer is compared against a PyTorch implementation timed in the
same minutes as modscope-bench's training section. It follows docs/MODEL.md (batched, with the MoD recipe of
scripts/train_model_zoo.sh: AdamW, gradient clipping 1.0, predictor BCE weight 1; plus a router BCE at weight
0.5, which an earlier recipe used and which costs a few element-wise operations) and shares no code with the
engine.

Usage: /usr/bin/python3 bench/pytorch_prototype_training.py [--steps 12] [--warmup 3] [--threads 1]
Prints one JSON object: tokens/s (median over steps) for MoD and dense, batch 16 x 256.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V, D, L, H, FF, T, B = 2048, 192, 6, 3, 512, 256, 16
ROUTED, CAPACITY = (1, 3, 5), 0.125


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rope_tables(hd, n):
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def rope(x, cos, sin, pos):  # x [B, H, S, hd], pos [B, S]
    half = x.shape[-1] // 2
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


class Block(nn.Module):
    def __init__(self, routed):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D, bias=False)
        self.gate_up = nn.Linear(D, 2 * FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)
        self.routed = routed
        if routed:
            self.router = nn.Linear(D, 1, bias=False)
            self.pred = nn.Sequential(nn.Linear(D, 64), nn.SiLU(), nn.Linear(64, 1))

    def delta(self, x, pos, cos, sin):
        b, s, _ = x.shape
        hd = D // H
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, H, hd).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin, pos) / math.sqrt(hd), rope(k, cos, sin, pos)
        scores = q @ k.transpose(-1, -2)
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        a = self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, D))
        g, u = self.gate_up(self.mlp_norm(x + a)).chunk(2, -1)
        return a + self.down(F.silu(g) * u)

    def forward(self, x, pos, cos, sin):
        if not self.routed:
            return x + self.delta(x, pos, cos, sin), None
        r = self.router(x).squeeze(-1)  # [B, T]
        k = max(1, math.ceil(CAPACITY * x.shape[1] - 1e-9))
        idx = r.topk(k, dim=1).indices.sort(1).values  # [B, k]
        gidx = idx.unsqueeze(-1).expand(-1, -1, D)
        xs = x.gather(1, gidx)
        upd = xs + torch.sigmoid(r.gather(1, idx)).unsqueeze(-1) * self.delta(xs, pos.gather(1, idx), cos, sin)
        target = torch.zeros_like(r).scatter(1, idx, 1.0)
        aux = 1.0 * F.binary_cross_entropy_with_logits(self.pred(x.detach()).squeeze(-1), target) + \
            0.5 * F.binary_cross_entropy_with_logits(r, target)
        return x.scatter(1, gidx, upd), aux


class Model(nn.Module):
    def __init__(self, dense):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(not dense and i in ROUTED) for i in range(L))
        self.norm = RMSNorm(D)
        self.cos, self.sin = rope_tables(D // H, T)

    def forward(self, ids):
        x = self.emb(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        aux = 0.0
        for blk in self.blocks:
            x, a = blk(x, pos, self.cos, self.sin)
            if a is not None:
                aux = aux + a
        return F.linear(self.norm(x), self.emb.weight), aux


def tokens_per_second(dense, steps, warmup):
    torch.manual_seed(1234)
    model = Model(dense)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, V, (B, T + 1))
        t0 = time.perf_counter()
        logits, aux = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mod = tokens_per_second(False, args.steps, args.warmup)
    dense = tokens_per_second(True, args.steps, args.warmup)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "batch": B, "seq_len": T,
                      "mod_tokens_per_second": round(mod), "dense_tokens_per_second": round(dense)}))


if __name__ == "__main__":
    main()
