#!/usr/bin/env python3
"""make_fixtures.py - PyTorch reference fixtures for the parity tests.

An independent PyTorch implementation (written from the math documented in
sparsemem.h, not from its C loops) of
  backbone_block  one pre-norm GPT block: x + proj(attn(qkv(rms(x)))), then
                  + fcproj(gelu(fc(rms(.))))
  engram          the Engram layer (gathered rows, gate, value, causal conv)
  peer            the PEER layer (product-key top-k over single-neuron experts)
  mhc             an mHC pre + post pair around F(u) = tanh(u), dynamic maps
  sinkhorn        Sinkhorn-Knopp alone
  gpt2            a whole random GPT-2 (GPT-2's LayerNorm, learned positions,
                  tied head), its weights written as an llm.c model file
                  (parity_gpt2_llmc.bin: int32 header[256] = 20240326, 3,
                  maxT, V, L, NH, C, Vp, then float32 parameters in llm.c's
                  order), and parity_gpt2.bin with a token batch, the
                  logits over the V real tokens and the mean loss of a
                  forward written here from GPT-2's math (forward only:
                  test_parity_gpt2_llmc loads the llm.c file with
                  sm_model_load_llmc and compares)
Each fixture holds the inputs, the parameters, the output and the gradient of
L = sum(out * w) (w a fixed random tensor, also stored) with respect to the
inputs and every parameter, from torch autograd. tests.c (test_parity_*)
runs our forward/backward on the same numbers and compares.

Usage (Debian: apt-get install python3-torch python3-numpy):
    /usr/bin/python3 scripts/make_fixtures.py [--out fixtures] [--float32]
(fixtures/ at the repo root: "tests" there is the test binary, and
.gitignore's "tests" pattern would ignore a tests/ directory anyway.)
By default the reference is computed in float64 from the float32 values that
are stored, so the reference carries essentially no rounding error of its
own and the measured difference is our float32 error; --float32 computes in
float32 instead (as a sanity check of the tolerances).

File format (little-endian), one file per fixture, NAME.bin:
    u32 magic 0x58464d53 ("SMFX"), u32 version 1, u32 n_records
    n_records x { u32 name_len, name bytes (no NUL), u32 ndim,
                  u32 dims[ndim], float32 data[prod(dims)] }
Integers (row indices, sizes) are stored as float32 (exact below 2^24).
Gradients are named "d" + the tensor name ("dx", "dqkv_w", ...).
"""
import argparse
import math
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F

MAGIC, VERSION = 0x58464D53, 1
RMS_EPS = 1e-6          # SM_RMSNORM_EPS
PEER_EPS = 1e-6         # SM_PEER_NORM_EPS
GATE_EPS = 1e-6         # Engram signed-sqrt clamp
DT = torch.float64


def write_fixture(path, records):
    """records: list of (name, tensor/array); written as float32."""
    with open(path, "wb") as f:
        f.write(struct.pack("<III", MAGIC, VERSION, len(records)))
        for name, t in records:
            a = np.ascontiguousarray(
                t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t),
                dtype="<f4")
            nb = name.encode()
            f.write(struct.pack("<I", len(nb)) + nb)
            f.write(struct.pack("<I", a.ndim) + struct.pack("<%dI" % a.ndim, *a.shape))
            f.write(a.tobytes())
    print("%-40s %6d bytes" % (path, os.path.getsize(path)))


def leaf(gen, shape, std=1.0, mean=0.0):
    """A float32-representable random tensor, promoted to DT, requiring grad."""
    t = (torch.randn(shape, generator=gen) * std + mean).float()
    return t.to(DT).requires_grad_(True)


def run(inputs, forward):
    """out = forward(**inputs); L = sum(out * w); returns records with inputs,
    w, out and every gradient."""
    out = forward(**inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).float().to(DT)
    loss = (out.to(torch.float64) * w.to(torch.float64)).sum()
    loss.backward()
    recs = [(k, v) for k, v in inputs.items()] + [("w", w), ("out", out)]
    recs += [("d" + k, v.grad) for k, v in inputs.items() if v.requires_grad]
    return recs


def rmsnorm(x, gain=None, eps=RMS_EPS):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if gain is None else y * gain


# ---- (a) backbone block ----------------------------------------------------

def causal_attention(qkv, n_head):
    """qkv [B,T,3C] = q | k | v; heads of C/n_head; softmax(q k^T/sqrt(hs)) v."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=-1)
    heads = lambda z: z.view(B, T, n_head, C // n_head).transpose(1, 2)  # [B,H,T,hs]
    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C)


def backbone_block(B=2, T=5, C=8, NH=2):
    g = torch.Generator().manual_seed(1)
    inp = dict(x=leaf(g, (B, T, C)),
               ln1_w=leaf(g, (C,), 0.2, 1.0),
               qkv_w=leaf(g, (3 * C, C), 0.3), qkv_b=leaf(g, (3 * C,), 0.1),
               proj_w=leaf(g, (C, C), 0.3), proj_b=leaf(g, (C,), 0.1),
               ln2_w=leaf(g, (C,), 0.2, 1.0),
               fc_w=leaf(g, (4 * C, C), 0.3), fc_b=leaf(g, (4 * C,), 0.1),
               fcproj_w=leaf(g, (C, 4 * C), 0.2), fcproj_b=leaf(g, (C,), 0.1))

    def fwd(x, ln1_w, qkv_w, qkv_b, proj_w, proj_b, ln2_w, fc_w, fc_b, fcproj_w, fcproj_b):
        qkv = F.linear(rmsnorm(x, ln1_w), qkv_w, qkv_b)
        x = x + F.linear(causal_attention(qkv, NH), proj_w, proj_b)
        hid = F.gelu(F.linear(rmsnorm(x, ln2_w), fc_w, fc_b), approximate="tanh")
        return x + F.linear(hid, fcproj_w, fcproj_b)

    return [("sizes", [B, T, C, NH])] + run(inp, fwd)


# ---- (a') a whole GPT-2, in llm.c's model file ------------------------------

LLMC_MAGIC, LLMC_F32 = 20240326, 3
LN_EPS = 1e-5           # GPT-2's LayerNorm


def gpt2_weights(g, V, Vp, maxT, L, C):
    """Random GPT-2 weights, float32-representable, named as llm.c orders
    them (per-layer tensors stacked over the layers)."""
    r = lambda shape, std, mean=0.0: (torch.randn(shape, generator=g) * std + mean).float().to(DT)
    wte = r((Vp, C), 0.3)
    wte[V:] = 0.0                     # llm.c's padding rows
    return [("wte", wte), ("wpe", r((maxT, C), 0.3)),
            ("ln1w", r((L, C), 0.2, 1.0)), ("ln1b", r((L, C), 0.2)),
            ("qkvw", r((L, 3 * C, C), 0.15)), ("qkvb", r((L, 3 * C), 0.1)),
            ("attprojw", r((L, C, C), 0.15)), ("attprojb", r((L, C), 0.1)),
            ("ln2w", r((L, C), 0.2, 1.0)), ("ln2b", r((L, C), 0.2)),
            ("fcw", r((L, 4 * C, C), 0.15)), ("fcb", r((L, 4 * C), 0.1)),
            ("fcprojw", r((L, C, 4 * C), 0.1)), ("fcprojb", r((L, C), 0.1)),
            ("lnfw", r((C,), 0.2, 1.0)), ("lnfb", r((C,), 0.2))]


def gpt2_logits(w, tokens, V, NH):
    """GPT-2's forward: x = wte[tok] + wpe[pos]; per layer x += attn(ln_1(x)),
    x += mlp(ln_2(x)) (GELU, tanh form); logits = ln_f(x) wte^T over the V
    real tokens."""
    B, T = tokens.shape
    C = w["wte"].shape[1]
    ln = lambda x, wt, b: F.layer_norm(x, (C,), wt, b, LN_EPS)
    x = w["wte"][tokens] + w["wpe"][:T]
    for l in range(w["ln1w"].shape[0]):
        qkv = F.linear(ln(x, w["ln1w"][l], w["ln1b"][l]), w["qkvw"][l], w["qkvb"][l])
        x = x + F.linear(causal_attention(qkv, NH), w["attprojw"][l], w["attprojb"][l])
        hid = F.gelu(F.linear(ln(x, w["ln2w"][l], w["ln2b"][l]), w["fcw"][l], w["fcb"][l]),
                     approximate="tanh")
        x = x + F.linear(hid, w["fcprojw"][l], w["fcprojb"][l])
    return F.linear(ln(x, w["lnfw"], w["lnfb"]), w["wte"][:V])


def write_llmc_model(path, weights, maxT, V, L, NH, C, Vp):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *([LLMC_MAGIC, LLMC_F32, maxT, V, L, NH, C, Vp] + [0] * 248)))
        for _, t in weights:
            f.write(np.ascontiguousarray(t.numpy(), dtype="<f4").tobytes())
    print("%-40s %6d bytes" % (path, os.path.getsize(path)))


def gpt2(out_dir, B=2, T=16, V=100, Vp=128, L=2, NH=4, C=64):
    g = torch.Generator().manual_seed(7)
    weights = gpt2_weights(g, V, Vp, T, L, C)
    write_llmc_model(os.path.join(out_dir, "parity_gpt2_llmc.bin"), weights, T, V, L, NH, C, Vp)
    tokens = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    logits = gpt2_logits(dict(weights), tokens, V, NH)
    loss = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
    return [("sizes", [B, T, V]), ("tokens", tokens), ("targets", targets),
            ("logits", logits), ("loss", loss.reshape(1))]


# ---- (b) Engram ------------------------------------------------------------

def engram(B=2, T=7, d=8, orders=(2, 3), K=2, d_head=4, rows_per_slot=3):
    """Table rows are addressed by given flat indices[N, n_slots]; slot s owns
    rows [s*rows_per_slot, (s+1)*rows_per_slot) (as each hash head owns its
    own range), and rows repeat across positions (gradients must add up)."""
    g = torch.Generator().manual_seed(2)
    n_slots, N = len(orders) * K, B * T
    d_mem, dil = n_slots * d_head, max(orders)
    flat = (torch.randint(0, rows_per_slot, (N, n_slots), generator=g)
            + torch.arange(n_slots) * rows_per_slot)
    inp = dict(h=leaf(g, (N, d)), table=leaf(g, (n_slots * rows_per_slot, d_head)),
               w_key=leaf(g, (d, d_mem), 0.4), b_key=leaf(g, (d,), 0.3),
               w_value=leaf(g, (d, d_mem), 0.25),
               norm_query=leaf(g, (d,), 0.3, 1.0), norm_key=leaf(g, (d,), 0.3, 1.0),
               norm_value=leaf(g, (d,), 0.3, 1.0), conv=leaf(g, (d, 4), 0.5))

    def gate_arg(h, table, w_key, b_key, norm_query, norm_key):
        e = table[flat].reshape(N, d_mem)          # concat of the rows hit
        k = F.linear(e, w_key, b_key)
        return e, (rmsnorm(h, norm_query) * rmsnorm(k, norm_key)).sum(-1) / math.sqrt(d)

    def fwd(h, table, w_key, b_key, w_value, norm_query, norm_key, norm_value, conv):
        e, gt = gate_arg(h, table, w_key, b_key, norm_query, norm_key)
        alpha = torch.sigmoid(torch.sign(gt) * torch.sqrt(gt.abs().clamp_min(GATE_EPS)))
        v = alpha[:, None] * F.linear(e, w_value)
        vn = rmsnorm(v, norm_value).view(B, T, d).transpose(1, 2)   # [B, d, T]
        # causal depthwise conv, tap j reads t - j*dil: left-pad 3*dil zeros;
        # conv1d's kernel index k reads t - (3-k)*dil, so flip the taps.
        c = F.conv1d(F.pad(vn, (3 * dil, 0)), conv.flip(-1).unsqueeze(1),
                     dilation=dil, groups=d)
        return v + F.silu(c.transpose(1, 2).reshape(N, d))

    with torch.no_grad():   # the signed sqrt is kinked at 0: keep gates clear
        _, gt = gate_arg(**{k: inp[k] for k in
                            ("h", "table", "w_key", "b_key", "norm_query", "norm_key")})
        assert gt.abs().min() > 1e-2, "gate too close to 0"
    recs = run(inp, fwd)
    return [("sizes", [B, T, d, len(orders), K, d_head]), ("orders", list(orders)),
            ("flat", flat)] + recs


# ---- (c) PEER --------------------------------------------------------------

def peer(BT=6, D=8, s=5, k=3, h=2, d_key=4, margin=0.05):
    half, N = d_key // 2, s * s

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(x=leaf(g, (BT, D)), w_q=leaf(g, (h * d_key, D), D ** -0.5),
                    q_gain=leaf(g, (h * d_key,), 0.3, 1.0),
                    keys1=leaf(g, (h, s, half), 1.0), keys2=leaf(g, (h, s, half), 1.0),
                    experts=leaf(g, (N, 2 * D), D ** -0.5))

    def scores(x, w_q, q_gain, keys1, keys2):
        q = F.linear(x, w_q).view(BT, h, d_key)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + PEER_EPS) * q_gain.view(h, d_key)
        s1 = torch.einsum("thd,hsd->ths", q[..., :half], keys1)
        s2 = torch.einsum("thd,hsd->ths", q[..., half:], keys2)
        return (s1[..., :, None] + s2[..., None, :]).reshape(BT, h, N)  # expert a*s+b

    def fwd(x, w_q, q_gain, keys1, keys2, experts):
        top, idx = scores(x, w_q, q_gain, keys1, keys2).topk(k, dim=-1)  # best first
        wts = top.softmax(-1)                                           # [BT,h,k]
        u, v = experts[idx][..., :D], experts[idx][..., D:]             # [BT,h,k,D]
        pre = (u * x[:, None, None, :]).sum(-1)
        act = F.gelu(pre, approximate="tanh")
        return ((wts * act)[..., None] * v).sum((1, 2)), idx

    for seed in range(3, 1000):   # data whose top-k is unambiguous
        inp = make(seed)
        with torch.no_grad():
            srt = scores(**{kk: inp[kk] for kk in ("x", "w_q", "q_gain", "keys1", "keys2")}) \
                .sort(-1, descending=True).values
        if (srt[..., :k] - srt[..., 1:k + 1]).min() > margin:  # all gaps down to k+1
            break
    else:
        raise RuntimeError("no seed gave top-k margins > %g" % margin)
    sel = {}
    recs = run(inp, lambda **kw: sel.setdefault("o", fwd(**kw))[0])
    return [("sizes", [BT, D, s, k, h, d_key]), ("expert", sel["o"][1])] + recs


# ---- (d, e) Sinkhorn and mHC -------------------------------------------------

def sinkhorn(logits, iters):
    """Doubly-stochastic projection of exp(logits[..., n, n]): iters rounds of
    row then column normalisation (a per-matrix shift does not change it)."""
    P = torch.exp(logits - logits.amax((-1, -2), keepdim=True))
    for _ in range(iters):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def sinkhorn_fixture(count=3, n=4, iters=20):
    g = torch.Generator().manual_seed(4)
    logits = leaf(g, (count, n, n), 1.5)
    return [("sizes", [count, n, iters])] + run(dict(logits=logits),
                                                lambda logits: sinkhorn(logits, iters))


def mhc(BT=4, n=4, C=8, iters=20):
    g = torch.Generator().manual_seed(5)
    K = 2 * n + n * n
    inp = dict(x=leaf(g, (BT, n, C)), phi=leaf(g, (K, n * C), 0.3),
               gate=torch.tensor([0.7, -0.5, 0.9], dtype=torch.float32).to(DT)
               .requires_grad_(True),
               bias=leaf(g, (K,), 0.5))

    def fwd(x, phi, gate, bias):
        z = F.linear(rmsnorm(x.reshape(BT, n * C)), phi)            # [BT, K], no gain
        a = torch.cat([gate[0].expand(n), gate[1].expand(n), gate[2].expand(n * n)])
        arg = a * z + bias
        h_pre = torch.sigmoid(arg[:, :n])                            # [BT, n]
        h_post = 2 * torch.sigmoid(arg[:, n:2 * n])                  # [BT, n]
        h_res = sinkhorn(arg[:, 2 * n:].reshape(BT, n, n), iters)    # [BT, n, n]
        y = torch.tanh(torch.einsum("ti,tic->tc", h_pre, x))         # F(u), u = H_pre x
        return torch.einsum("tij,tjc->tic", h_res, x) + h_post[:, :, None] * y[:, None, :]

    return [("sizes", [BT, n, C, iters])] + run(inp, fwd)


def main():
    global DT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    ap.add_argument("--float32", action="store_true", help="compute the reference in float32")
    a = ap.parse_args()
    if a.float32:
        DT = torch.float32
    os.makedirs(a.out, exist_ok=True)
    for name, fn in [("backbone_block", backbone_block), ("engram", engram), ("peer", peer),
                     ("mhc", mhc), ("sinkhorn", sinkhorn_fixture)]:
        write_fixture(os.path.join(a.out, "parity_%s.bin" % name), fn())
    write_fixture(os.path.join(a.out, "parity_gpt2.bin"), gpt2(a.out))


if __name__ == "__main__":
    main()
