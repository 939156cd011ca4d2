#!/usr/bin/env python3
"""safetensors_loss.py - the loss of a sparsemem safetensors export, in PyTorch.

    /usr/bin/python3 scripts/safetensors_loss.py MODEL.safetensors TOKENS.txt [--float64]
        [--canon CANON.txt]

TOKENS.txt holds one sequence per line: T+1 token ids separated by white
space; the inputs are the first T, the targets the last T. Prints
"loss X", the mean cross-entropy over every position.

The file is parsed by hand (u64 header length, JSON, byte buffer; no
safetensors package) and the model is rebuilt from the config in its
__metadata__ ("sm.*" keys) with an independent PyTorch implementation,
written from the math documented in sparsemem.h: the pre-norm backbone
(RMSNorm, or GPT-2's LayerNorm with bias for the GPT-2 arch; causal
attention, tanh-GELU MLP, learned positions, tied or untied head, logits
over the real vocabulary where the embedding is padded), mHC (n residual
streams, Sinkhorn-projected H_res, expand by copy, collapse by the mean),
PEER (product-key top-k over single-neuron experts) and Engram (the n-gram
hash from its seed, the gated value and the causal conv; per stream inside
mHC, or an mHC branch). rmsnorm, causal_attention and sinkhorn come from
make_fixtures.py. Engram-Nine (its hot tier is built from the data, not
stored) is refused. The linear weights are in Hugging Face's Conv1D layout
[in, out] (y = x W + b), as the export writes them.

Engram hashes canonical token ids: the tokenizer's compression table, which
the export does not hold (it comes from the vocabulary, as when training).
--canon gives it (vocab_size ids, white-space separated); without it the
ids hash as they are, as in a model that was never given one.

By default the computation is in float32, as the C model's; --float64
computes in float64 from the stored float32 weights.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import GATE_EPS, LN_EPS, PEER_EPS, causal_attention, rmsnorm, sinkhorn  # noqa: E402

NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def read_safetensors(path):
    """(tensors by name as float32 torch tensors, metadata dict)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError("%s: shorter than the 8-byte header length" % path)
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > len(data) - 8:
        raise ValueError("%s: header length %d runs past the end of the file" % (path, n))
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    buf = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = np.frombuffer(buf[begin:end], dtype=NUMPY_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":  # the high half of a float32
            raw = (raw.astype(np.uint32) << 16).view("<f4")
        tensors[name] = torch.from_numpy(raw.astype(np.float32).reshape(info["shape"]))
    return tensors, meta


ARRAY_KEYS = ("engram.hash.orders", "engram.hash.layer_ids", "nine.n_hot", "peer_layer_ids")


def config_of(meta):
    """The sm.* metadata as numbers; arrays as lists (their trailing zeros
    are left out of the file: index past the end means 0)."""
    def num(s):
        return float(s) if any(c in s for c in ".eEn") else int(s)
    cfg = {}
    for key, value in meta.items():
        if key.startswith("sm."):
            items = [num(v) for v in value.split(",")] if value else []
            cfg[key[3:]] = items if key[3:] in ARRAY_KEYS else items[0]
    return cfg


def layer_ids(cfg, key, count):
    ids = cfg[key] + [0] * cfg[count]
    return ids[:cfg[count]]


M64 = (1 << 64) - 1


def mix64(x):
    """sm_mix64: the murmur3 finaliser."""
    x ^= x >> 33
    x = (x * 0xff51afd7ed558ccd) & M64
    x ^= x >> 33
    x = (x * 0xc4ceb9fe1a85ec53) & M64
    return x ^ (x >> 33)


def rng(seed):
    """sm_rng: xoshiro256** seeded by four splitmix64 outputs; yields u64s."""
    s = []
    for _ in range(4):
        seed = (seed + 0x9e3779b97f4a7c15) & M64
        z = ((seed ^ (seed >> 30)) * 0xbf58476d1ce4e5b9) & M64
        z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
        s.append(z ^ (z >> 31))
    rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & M64  # noqa: E731
    while True:
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        yield result


def next_prime(n):
    def prime(n):
        return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))
    while not prime(n):
        n += 1
    return n


class NgramHash:
    """sm_ngram_hash from the config: per hash set (one per Engram layer, or
    one shared) eight odd multipliers from an sm_rng seeded by (seed, layer
    id); per (set, order, head) a distinct prime table size, successive from
    table_rows, the heads' rows one after another in the flat table."""
    def __init__(self, cfg):
        p = "engram.hash."
        self.orders = (cfg[p + "orders"] + [0] * 8)[:cfg[p + "n_orders"]]
        self.heads, self.pad, self.share = cfg[p + "n_heads"], cfg[p + "pad_id"], cfg[p + "share_tables"]
        ids = layer_ids(cfg, p + "layer_ids", p + "n_layers")
        self.mult = []
        for layer in ([0] if self.share else ids):
            key = 0 if self.share else layer + 1
            draw = rng(cfg[p + "seed"] ^ mix64((key * 0x9e3779b97f4a7c15 + 1) & M64))
            self.mult.append([next(draw) | 1 for _ in range(8)])
        self.primes, self.offsets, size, offset = [], [], cfg[p + "table_rows"], 0
        for _ in range(len(self.mult) * len(self.orders) * self.heads):
            size = next_prime(size)
            self.primes.append(size)
            self.offsets.append(offset)
            offset, size = offset + size, size + 1

    def rows(self, tokens, e):
        """Flat table rows [B, T, n_orders * heads] of Engram layer e: the
        suffix n-gram of each order (token t, t-1, ...; pad_id before the
        sequence start) mixed by XOR of token x multiplier, mod each head's
        prime. The script's sequences have no document starts."""
        s = 0 if self.share else e
        m, n_slots = self.mult[s], len(self.orders) * self.heads
        out = []
        for seq in tokens.tolist():
            row = []
            for t in range(len(seq)):
                gram = [seq[t - k] if t - k >= 0 else self.pad for k in range(max(self.orders))]
                for i, order in enumerate(self.orders):
                    mix = 0
                    for k in range(order):
                        mix ^= (gram[k] * m[k]) & M64
                    for j in range(self.heads):
                        slot = s * n_slots + i * self.heads + j
                        row.append(self.offsets[slot] + mix % self.primes[slot])
            out.append(row)
        return torch.tensor(out).view(tokens.shape[0], tokens.shape[1], n_slots)


def engram(h, W, i, e, cfg, rows):
    """Engram layer e (at transformer layer i) on h [B, T, S*C] or [B, T, S,
    C] (S streams: per-stream gates and convs over a shared memory and
    value): e_t the table rows hit, k_s = W_K^s e + b_K^s, alpha_s =
    sigmoid(signed sqrt(<RMSNorm(h_s), RMSNorm(k_s)> / sqrt(C))), v_s =
    alpha_s W_V e, out_s = v_s + SiLU(causal depthwise conv(RMSNorm(v_s)))
    with taps t, t - dil, ... (dil = the largest order)."""
    p = "h.%d.engram." % i
    B, T = rows.shape[:2]
    S, C = cfg["engram.n_streams"], cfg["d_model"]
    mem = W["engram.table"][rows].reshape(B, T, -1)
    d_mem = mem.shape[-1]
    hs = h.reshape(B, T, S, C)
    key = linear(mem, W[p + "w_key"].view(S * C, d_mem).T, W[p + "b_key"]).view(B, T, S, C)
    g = (rmsnorm(hs, W[p + "norm_query"].view(S, C)) * rmsnorm(key, W[p + "norm_key"].view(S, C))).sum(-1)
    g = g / C ** 0.5
    if cfg["engram.signed_sqrt_gate"]:
        g = torch.sign(g) * torch.sqrt(g.abs().clamp_min(GATE_EPS))
    v = torch.sigmoid(g)[..., None] * linear(mem, W[p + "w_value"].view(C, d_mem).T)[:, :, None, :]
    vn = rmsnorm(v, W[p + "norm_value"].view(S, C)).reshape(B, T, S * C).transpose(1, 2)
    dil = max(cfg["engram.hash.orders"][:cfg["engram.hash.n_orders"]])
    taps = W[p + "conv"].view(S * C, 4)
    c = F.conv1d(F.pad(vn, (3 * dil, 0)), taps.flip(-1).unsqueeze(1), dilation=dil, groups=S * C)
    return (v + F.silu(c.transpose(1, 2).reshape(B, T, S, C))).reshape(h.shape)


def linear(x, w, b=None):
    """Conv1D layout: w is [in, out]."""
    y = x @ w
    return y if b is None else y + b


def norm(u, W, name, cfg):
    """The backbone's norm `name`: RMSNorm, or with the GPT-2 arch (1)
    LayerNorm with gain and bias."""
    if cfg.get("arch", 0) == 1:
        return F.layer_norm(u, u.shape[-1:], W[name + ".weight"], W[name + ".bias"], LN_EPS)
    return rmsnorm(u, W[name + ".weight"])


def attention(u, W, i, cfg):
    p = "h.%d." % i
    qkv = linear(norm(u, W, p + "ln_1", cfg), W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"])
    return linear(causal_attention(qkv, cfg["n_head"]), W[p + "attn.c_proj.weight"], W[p + "attn.c_proj.bias"])


def peer(x, W, i, cfg, C):
    """x [B, T, C]: the sum over heads of the softmax-weighted top-k experts,
    expert a*s + b scored by keys1[a] + keys2[b]."""
    p = "h.%d.peer." % i
    h, s, k, dk = cfg["peer.heads"], cfg["peer.n_sub"], cfg["peer.topk"], cfg["peer.d_key"]
    if cfg["peer.query_norm"] != 0:
        raise SystemExit("PEER with LayerNorm queries is not implemented here (RMSNorm only)")
    half, lead = dk // 2, x.shape[:-1]
    q = F.linear(x, W[p + "w_q"].view(h * dk, C)).view(*lead, h, dk)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + PEER_EPS) * W[p + "q_gain"].view(h, dk)
    tables = 1 if cfg["peer.shared_keys"] else h
    k1, k2 = (W[p + kk].view(tables, s, half).expand(h, s, half) for kk in ("keys1", "keys2"))
    s1 = torch.einsum("...hd,hsd->...hs", q[..., :half], k1)
    s2 = torch.einsum("...hd,hsd->...hs", q[..., half:], k2)
    scores = (s1[..., :, None] + s2[..., None, :]).reshape(*lead, h, s * s)
    top, idx = scores.topk(k, dim=-1)
    experts = W[p + "experts"].view(s * s, 2 * C)[idx]                 # [..., h, k, 2C]
    pre = (experts[..., :C] * x[..., None, None, :]).sum(-1)
    act = F.gelu(pre, approximate="tanh") if cfg["peer.activation"] == 0 else F.relu(pre)
    return ((top.softmax(-1) * act)[..., None] * experts[..., C:]).sum((-3, -2))


def feed_forward(u, W, i, cfg, C):
    p = "h.%d." % i
    ln = norm(u, W, p + "ln_2", cfg)
    has_peer = cfg["use_peer"] and i in layer_ids(cfg, "peer_layer_ids", "peer_n_layers")
    y = 0
    if not (has_peer and cfg["peer_replace_mlp"]):
        hid = F.gelu(linear(ln, W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"]), approximate="tanh")
        y = linear(hid, W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"])
    return y + peer(ln, W, i, cfg, C) if has_peer else y


def mhc_branch(x, W, name, cfg, fn):
    """x [B, T, n, C]: maps from RMSNorm(flattened streams), u = H_pre x,
    x' = H_res x + H_post^T fn(u)."""
    B, T, n, C = x.shape
    K = 2 * n + n * n
    gate_bias = W[name + ".gate_bias"]
    if cfg["mhc.dynamic"]:
        gate, bias = gate_bias[:3], gate_bias[3:]
        z = F.linear(rmsnorm(x.reshape(B, T, n * C)), W[name + ".phi"].view(K, n * C))
        arg = torch.cat([gate[0].expand(n), gate[1].expand(n), gate[2].expand(n * n)]) * z + bias
    else:
        arg = gate_bias.expand(B, T, K)
    h_pre, h_post = torch.sigmoid(arg[..., :n]), 2 * torch.sigmoid(arg[..., n:2 * n])
    h_res = sinkhorn(arg[..., 2 * n:].reshape(B, T, n, n), cfg["mhc.sinkhorn_iters"])
    y = fn(torch.einsum("bti,btic->btc", h_pre, x))
    return torch.einsum("btij,btjc->btic", h_res, x) + h_post[..., None] * y[:, :, None, :]


def model_loss(W, cfg, inputs, targets, canon=None):
    if cfg["use_nine"]:
        raise SystemExit("an Engram-Nine model: its hot tier comes from the data, not the export")
    engram_ids = layer_ids(cfg, "engram.hash.layer_ids", "engram.hash.n_layers") if cfg["use_engram"] else []
    rows = {}
    if engram_ids:
        H = NgramHash(cfg)
        ids = inputs if canon is None else canon[inputs]
        rows = {layer: H.rows(ids, e) for e, layer in enumerate(engram_ids)}
    C, T = cfg["d_model"], inputs.shape[1]
    x = W["wte.weight"][inputs] + W["wpe.weight"][:T]
    n = cfg["mhc.n_streams"] if cfg["use_mhc"] else 0
    if n:
        x = x[:, :, None, :].expand(-1, -1, n, -1)
    for i in range(cfg["n_layer"]):
        blocks = [("attn", lambda u, i=i: attention(u, W, i, cfg)),
                  ("ffn", lambda u, i=i: feed_forward(u, W, i, cfg, C))]
        if i in rows:  # per stream (no branch) when it reads all n streams
            blocks.insert(0, ("engram", lambda u, i=i: engram(u, W, i, engram_ids.index(i), cfg, rows[i])))
        for kind, fn in blocks:
            branch = n and not (kind == "engram" and cfg["engram.n_streams"] > 1)
            x = mhc_branch(x, W, "h.%d.mhc.%s" % (i, kind), cfg, fn) if branch else x + fn(x)
    if n:
        x = x.mean(2)
    head = W.get("lm_head.weight", W["wte.weight"])[:cfg["vocab_size"]]  # padded rows: no logits
    logits = norm(x, W, "ln_f", cfg) @ head.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("--float64", action="store_true", help="compute in float64")
    ap.add_argument("--canon", help="the tokenizer's canonical ids, vocab_size of them (Engram)")
    a = ap.parse_args()
    tensors, meta = read_safetensors(a.model)
    dt = torch.float64 if a.float64 else torch.float32
    W = {k: v.to(dt) for k, v in tensors.items()}
    with open(a.tokens) as f:
        seqs = torch.tensor([[int(t) for t in line.split()] for line in f if line.strip()])
    canon = None
    if a.canon:
        with open(a.canon) as f:
            canon = torch.tensor([int(v) for v in f.read().split()])
    with torch.no_grad():
        loss = model_loss(W, config_of(meta), seqs[:, :-1], seqs[:, 1:], canon)
    print("loss %.9g" % loss.item())


if __name__ == "__main__":
    main()
