#!/usr/bin/python3
"""Writes fuzz/corpus/checkpoint: weights.pt files for fuzz_checkpoint's model (fuzz_checkpoint.cpp's
fuzzConfig(): vocab 16, d_model 8, 2 layers, 2 heads, d_ff 16, layer 1 routed, predictor_hidden 4), one valid
and a few near-valid ones, as Python's torch.save writes them (docs/MODEL.md lists the tensors).
Run with Debian's /usr/bin/python3 (python3-torch)."""
import io
import os
import torch

V, D, FF, H = 16, 8, 16, 4
ROUTED = {1}


def weights():
    torch.manual_seed(1)
    d = {"tok_emb.weight": torch.randn(V, D) * 0.02}
    for i in range(2):
        p = f"layers.{i}."
        d[p + "attn_norm.weight"] = torch.ones(D)
        d[p + "attn.qkv.weight"] = torch.randn(3 * D, D) * 0.02
        d[p + "attn.proj.weight"] = torch.randn(D, D) * 0.02
        d[p + "mlp_norm.weight"] = torch.ones(D)
        d[p + "mlp.gate_up.weight"] = torch.randn(2 * FF, D) * 0.02
        d[p + "mlp.down.weight"] = torch.randn(D, FF) * 0.02
        if i in ROUTED:
            d[p + "router.weight"] = torch.randn(1, D) * 0.02
            d[p + "predictor.fc1.weight"] = torch.randn(H, D) * 0.02
            d[p + "predictor.fc1.bias"] = torch.zeros(H)
            d[p + "predictor.fc2.weight"] = torch.randn(1, H) * 0.02
            d[p + "predictor.fc2.bias"] = torch.zeros(1)
    d["norm_f.weight"] = torch.ones(D)
    return d


def save(name, d, **kw):
    buf = io.BytesIO()
    torch.save(d, buf, **kw)
    data = buf.getvalue()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "checkpoint", name)
    with open(out, "wb") as f:
        f.write(data)
    return data


good = save("valid.pt", weights())
save("legacy_format.pt", weights(), _use_new_zipfile_serialization=False)
d = weights(); d["layers.1.router.weight"][0, 2] = float("nan"); save("nan.pt", d)
d = weights(); del d["layers.0.mlp.down.weight"]; save("missing.pt", d)
d = weights(); d["norm_f.weight"] = torch.ones(D + 1); save("wrong_shape.pt", d)
d = weights(); d["norm_f.weight"] = d["norm_f.weight"].double(); save("float64.pt", d)
d = weights(); d["extra"] = torch.zeros(2); save("extra.pt", d)
d = weights(); d["tok_emb.weight"] = (torch.randn(D, V) * 0.02).t(); save("transposed.pt", d)  # a strided view
save("list.pt", [torch.zeros(2), 3])
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "checkpoint", "truncated.pt")
with open(out, "wb") as f:
    f.write(good[: len(good) // 2])
