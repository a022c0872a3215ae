#!/usr/bin/python3
"""An independent implementation of docs/MODEL.md in PyTorch.

It shares no code with the C++ engine: it reads a ModScope checkpoint directory (config.json, weights.pt)
and computes logits and routing decisions from the specification alone. The test suite runs it against the
C++ engine; it is also the starting point for anyone who trains MoD models in Python and wants to open them
in ModScope: build a state dict with these names and shapes, `torch.save(state_dict, "weights.pt")`, write
config.json, add a SentencePiece `tokenizer.model`, and open the folder in the app.

Usage:
  mod_reference.py CHECKPOINT_DIR --ids 1,2,3 [--capacity 0.125] [--mode topk|causal]   (prints JSON)
  mod_reference.py CHECKPOINT_DIR --compare EXPECTED.json                            (exit 1 on mismatch)
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

# Two float32 implementations of the same arithmetic differ in the last bits (summation order in the matrix
# products), so a value this close to a routing boundary may fall either side in either. Comparisons follow the
# engine's decision there and report how many such ties they met; any other difference is a failure.
NEAR_TIE = 1e-4


class ModReference:
    def __init__(self, checkpoint_dir):
        with open(f"{checkpoint_dir}/config.json") as f:
            self.cfg = json.load(f)
        # float16 files (docs/MODEL.md) run in float32 like float32 ones.
        self.w = {name: t.float() for name, t in torch.load(f"{checkpoint_dir}/weights.pt").items()}
        c = self.cfg
        self.d, self.H = c["d_model"], c["n_heads"]
        self.hd = self.d // self.H
        inv_freq = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        angles = torch.outer(torch.arange(c["max_seq_len"], dtype=torch.float32), inv_freq)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.eps = c.get("norm_eps", 1e-5)
        self.threshold = c.get("predictor_threshold", 0.5)
        self.budget_gain = c.get("predictor_budget_gain", 0.0)
        self.prefix_topk = c.get("predictor_prefix_topk", False)

    def rmsnorm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def rope(self, x, pos):  # x [H, S, hd], pos [S]
        half = self.hd // 2
        c, s = self.cos[pos], self.sin[pos]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)

    def mixture(self, i, h, engine=None, ties=None):
        """docs/MODEL.md "Mixture layers": h [S, d] normed, the tokens that reach the mixture in order ->
        (update [S, d], the expert that ran each token or -1). With engine (its choices for these tokens), a top
        choice within rounding of the runner-up (NEAR_TIE) follows the engine's, and is listed in ties."""
        c, p = self.cfg, f"layers.{i}.mlp."
        E, Z, factor = c["n_experts"], c.get("noop_experts", 0), c.get("expert_capacity_factor", 1.25)
        probs = (h @ self.w[p + "router.weight"].T).softmax(-1)
        top = probs.topk(min(2, E + Z), -1)
        out, experts, taken = torch.zeros_like(h), [], [0] * E
        for j in range(h.shape[0]):
            choice = int(top.indices[j, 0])
            if engine is not None and engine[j] != choice and E + Z > 1 and \
                    float(top.values[j, 0] - top.values[j, 1]) < NEAR_TIE and engine[j] == int(top.indices[j, 1]):
                choice = engine[j]
                ties.append(j)
            if choice >= E:  # a no-op
                experts.append(-1)
                continue
            cap = min(max(math.ceil(factor * (j + 1) / E - 1e-9), 1), j + 1)
            if taken[choice] >= cap:  # overflow: earlier tokens filled the expert's share so far
                experts.append(-1)
                continue
            taken[choice] += 1
            g, u = (h[j] @ self.w[p + "gate_up"][choice].T).split(c["d_ff"], -1)
            out[j] = probs[j, choice] * ((F.silu(g) * u) @ self.w[p + "down"][choice].T)
            experts.append(choice)
        return out, experts

    def block_delta(self, i, x, pos, engine_choice=None, ties=None):
        """x [S, d] the selected tokens in order, pos [S] -> (f(x) [S, d], each token's expert or None)."""
        p = f"layers.{i}."
        S = x.shape[0]
        hn = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
        q, k, v = (hn @ self.w[p + "attn.qkv.weight"].T).split(self.d, -1)
        q, k, v = (t.view(S, self.H, self.hd).transpose(0, 1) for t in (q, k, v))
        q, k = self.rope(q, pos), self.rope(k, pos)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        future = torch.ones(S, S, dtype=torch.bool).triu(1)
        scores = torch.where(future, torch.tensor(float("-inf")), scores)
        a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(S, self.d) @ self.w[p + "attn.proj.weight"].T
        mn = self.rmsnorm(x + a, self.w[p + "mlp_norm.weight"])
        if i in self.cfg.get("moe_layers", []):
            m, experts = self.mixture(i, mn, engine_choice, ties)
            return a + m, experts
        g, u = (mn @ self.w[p + "mlp.gate_up.weight"].T).split(self.cfg["d_ff"], -1)
        m = (F.silu(g) * u) @ self.w[p + "mlp.down.weight"].T
        return a + m, None

    def causal_selection(self, pred_logit, r, capacity, engine=None, ties=None, forced=None):
        """docs/MODEL.md "Causal mode": decided in order, from earlier decisions and earlier router logits.

        With engine (its decisions for this layer), a decision that differs from this one only because a value
        sits within rounding of its boundary (NEAR_TIE) follows the engine's, and is listed in ties. forced: a
        list of None, True or False per token (docs/MODEL.md "Interventions"), counted as earlier decisions."""
        sel, taken = [], 0
        for t in range(len(r)):
            if forced is not None and forced[t] is not None:
                sel.append(forced[t])
                taken += forced[t]
                continue
            shortfall = capacity * (t + 1) - taken
            margin = pred_logit[t].double().item() + self.budget_gain * shortfall - math.log(
                self.threshold / (1.0 - self.threshold))
            ok = margin > 0
            near = abs(margin) < NEAR_TIE
            if self.prefix_topk:
                k_so_far = min(max(math.ceil(capacity * (t + 1) - 1e-9), 1), t + 1)
                ok = ok and int((r[:t] > r[t]).sum()) < k_so_far
                near = near or bool(((r[:t] - r[t]).abs() < NEAR_TIE).any())
            if engine is not None and engine[t] != ok and near:
                ok = engine[t]
                ties.append(t)
            sel.append(ok)
            taken += ok
        return torch.tensor(sel, dtype=torch.bool)

    @staticmethod
    def forced_decisions(overrides, T):
        """docs/MODEL.md "Interventions": {layer: [None | True | False] * T} from [[layer, position, process]]
        (position -1: every token); a single position's override wins over its layer's."""
        forced = {}
        for whole in (True, False):
            for layer, position, process in overrides:
                if (position == -1) != whole:
                    continue
                row = forced.setdefault(layer, [None] * T)
                for t in (range(T) if whole else [position]):
                    row[t] = bool(process)
        return forced

    @staticmethod
    def forced_topk(r, topk, k, forced, keep_capacity):
        """Top-k mode under forced decisions: exact flip, or the forced-in plus the best-ranked free tokens."""
        T = len(r)
        if not keep_capacity:
            return torch.tensor([topk[t].item() if forced[t] is None else forced[t] for t in range(T)])
        free = [t for t in range(T) if forced[t] is None]
        forced_in = sum(1 for f in forced if f is True)
        free.sort(key=lambda t: (-r[t].item(), t))
        take = set(free[:max(0, min(k - forced_in, len(free)))])
        return torch.tensor([forced[t] is True or t in take for t in range(T)])

    def forward(self, ids, capacity=None, mode="topk", engine_layers=None, ties=None, overrides=(),
                keep_capacity=False):
        """engine_layers: the engine's decisions ([{"selected": [...]}] per layer), followed at near ties.
        overrides: forced decisions, [[layer, position, process]] (docs/MODEL.md "Interventions")."""
        c = self.cfg
        capacity = c["capacity"] if capacity is None else capacity
        T = len(ids)
        forced = self.forced_decisions(overrides, T)
        x = self.w["tok_emb.weight"][torch.tensor(ids)]
        pos = torch.arange(T)
        layers = []
        expert_ties = []
        for i in range(c["n_layers"]):
            engine_choice = None
            if engine_layers is not None and engine_layers[i].get("expert_choice") is not None:
                engine_choice = engine_layers[i]["expert_choice"]
            if i not in c["routed_layers"]:
                delta, experts = self.block_delta(i, x, pos, engine_choice, expert_ties)
                x = x + delta
                layers.append({"routed": False, "selected": [True] * T, "expert": experts})
                continue
            p = f"layers.{i}."
            r = x @ self.w[p + "router.weight"][0]
            hp = F.silu(x @ self.w[p + "predictor.fc1.weight"].T + self.w[p + "predictor.fc1.bias"])
            pred_logit = hp @ self.w[p + "predictor.fc2.weight"][0] + self.w[p + "predictor.fc2.bias"][0]
            prob = torch.sigmoid(pred_logit)
            k = min(max(math.ceil(capacity * T - 1e-9), 1), T)
            topk = torch.zeros(T, dtype=torch.bool)
            topk[r.topk(k).indices] = True
            engine = None if engine_layers is None else engine_layers[i]["selected"]
            layer_ties = []
            if mode == "topk":
                sel = topk
                if engine is not None and i not in forced:
                    theirs = torch.tensor(engine, dtype=torch.bool)
                    differ = (theirs != topk).nonzero().view(-1)
                    kth = r.topk(k).values[-1]
                    if len(differ) and int(theirs.sum()) == k and bool(((r[differ] - kth).abs() < NEAR_TIE).all()):
                        sel, layer_ties = theirs, differ.tolist()
                if i in forced:
                    sel = self.forced_topk(r, topk, k, forced[i], keep_capacity)
            else:
                sel = self.causal_selection(pred_logit, r, capacity, engine, layer_ties, forced.get(i))
            if ties is not None:
                ties.extend((i, t) for t in layer_ties)
            idx = sel.nonzero().view(-1)  # ascending: original order
            experts = [-1] * T if i in c.get("moe_layers", []) else None
            if len(idx):
                xs = x[idx]
                selected_choice = None if engine_choice is None else [engine_choice[t] for t in idx.tolist()]
                delta, chosen = self.block_delta(i, xs, pos[idx], selected_choice, expert_ties)
                updated = xs + torch.sigmoid(r[idx]).unsqueeze(-1) * delta
                x = x.clone()
                x[idx] = updated
                if experts is not None:
                    for t, e in zip(idx.tolist(), chosen):
                        experts[t] = e
            layers.append({"routed": True, "k": k, "selected": sel.tolist(), "topk": topk.tolist(),
                           "router_logits": r.tolist(), "predictor_prob": prob.tolist(), "expert": experts})
        if ties is not None:
            ties.extend(("expert", j) for j in expert_ties)
        logits = self.rmsnorm(x, self.w["norm_f.weight"]) @ self.w["tok_emb.weight"].T
        return logits, layers


def compare(ref, expected):
    """expected: {"cases": [{"ids", "capacity", "mode", "positions": [p...], "logits": [[V floats] per position],
    "tolerance", "layers": [{"selected": [T booleans], and in mixture layers "expert" and "expert_choice": [T
    ints]}]}]}. Every routing decision must match (at a near tie,
    NEAR_TIE, the engine's is followed and counted), and the logits at the listed positions lie within the case's
    absolute tolerance."""
    worst = 0.0
    problems = []
    ties = 0
    for n, case in enumerate(expected["cases"]):
        case_ties = []
        with torch.no_grad():
            logits, layers = ref.forward(case["ids"], case["capacity"], case["mode"], case["layers"], case_ties,
                                         case.get("overrides", ()), case.get("keep_capacity", False))
        ties += len(case_ties)
        diff = (logits[case["positions"]] - torch.tensor(case["logits"])).abs().max().item()
        worst = max(worst, diff)
        if diff > case["tolerance"]:
            problems.append(f"case {n}: max |logit difference| {diff:.3g}")
        if "token_loss" in case:  # the loss of each next token, by PyTorch's own cross-entropy
            ids = torch.tensor(case["ids"])
            mine = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
            theirs = case["token_loss"]
            if theirs[-1] is not None or len(theirs) != len(ids):
                problems.append(f"case {n}: token_loss must have T values, the last null")
            elif len(ids) > 1:
                loss_diff = (mine - torch.tensor(theirs[:-1])).abs().max().item()
                if loss_diff > case["tolerance"]:
                    problems.append(f"case {n}: max |token loss difference| {loss_diff:.3g}")
        for i, (mine, theirs) in enumerate(zip(layers, case["layers"])):
            for t, (a, b) in enumerate(zip(mine["selected"], theirs["selected"])):
                if a != b:
                    problems.append(f"case {n} layer {i} token {t}: reference selected={a}, engine selected={b}")
            if (mine["expert"] is None) != (theirs.get("expert") is None):
                problems.append(f"case {n} layer {i}: a mixture layer in one and not the other")
            elif mine["expert"] is not None:
                for t, (a, b) in enumerate(zip(mine["expert"], theirs["expert"])):
                    if a != b:
                        problems.append(f"case {n} layer {i} token {t}: reference expert {a}, engine expert {b}")
    print(json.dumps({"cases": len(expected["cases"]), "max_logit_diff": worst, "near_ties": ties,
                      "problems": problems[:20]}))
    return not problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--ids")
    ap.add_argument("--capacity", type=float)
    ap.add_argument("--mode", default="topk", choices=["topk", "causal"])
    ap.add_argument("--compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = ModReference(args.checkpoint)
    if args.compare:
        with open(args.compare) as f:
            sys.exit(0 if compare(ref, json.load(f)) else 1)
    ids = [int(t) for t in args.ids.split(",")]
    with torch.no_grad():
        logits, layers = ref.forward(ids, args.capacity, args.mode)
    print(json.dumps({"next_token": int(logits[-1].argmax()), "layers": layers}))


if __name__ == "__main__":
    main()
