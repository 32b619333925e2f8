"""Plain numpy (float64) reference of the whole model, for the tests in this directory.

Written from the architecture's description (DESIGN.md section 3; CLIP/SigLIP/LLaMA semantics as
HuggingFace implements them) with explicit loops where they make the order obvious. It never calls
the code under test: it only reads parameter trees (nested dicts of arrays named like the Flax
modules) and ml_collections configs.
"""

import math

import numpy as np

ERF = np.vectorize(math.erf)
ACTIVATIONS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + ERF(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
}


def f64(tree):
    """Every array of a nested dict as float64 numpy."""
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


# --------------------------------------------------------------------------- basics
def softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def rms_norm(x, p, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]


def rope(x, positions, theta):
    """HF rotate_half RoPE. x: [batch, seq, heads, dim]; positions: [batch, seq]."""
    dim = x.shape[-1]
    half = dim // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = (positions / theta ** (2 * i / dim))[..., None]  # [batch, seq, 1]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def linear(x, p):
    """A projection whose kernel maps x's last axis onto one or more output axes."""
    y = np.tensordot(x, p["kernel"], axes=1)
    return y + p["bias"] if "bias" in p else y


def attention(p, x, num_heads, num_kv_heads, allowed, positions=None, theta=None, qk_norm_eps=None):
    """Multi-head attention; query head h reads kv head h // (num_heads / num_kv_heads).

    x: [batch, seq, d]; allowed: [batch, q, kv] bool (which keys each query may see).
    """
    q, k, v = linear(x, p["q"]), linear(x, p["k"]), linear(x, p["v"])  # [b, s, heads, hd]
    if qk_norm_eps is not None:
        q, k = rms_norm(q, p["q_norm"], qk_norm_eps), rms_norm(k, p["k_norm"], qk_norm_eps)
    if theta is not None:
        q, k = rope(q, positions, theta), rope(k, positions, theta)
    group = num_heads // num_kv_heads
    batch, seq, _, head_dim = q.shape
    out = np.zeros_like(q)
    for b, h in np.ndindex(batch, num_heads):
        scores = q[b, :, h] @ k[b, :, h // group].T / math.sqrt(head_dim)
        scores = np.where(allowed[b], scores, -np.inf)
        seen = allowed[b].any(-1)  # padding queries of packed rows see nothing: output 0
        out[b, seen, h] = softmax(scores[seen]) @ v[b, :, h // group]
    y = np.einsum("bshk,hkd->bsd", out, p["o"]["kernel"])
    return y + p["o"]["bias"] if "bias" in p["o"] else y


def dense_ffn(p, x, activation, gated):
    act = ACTIVATIONS[activation]
    if gated:
        return linear(act(linear(x, p["gate"])) * linear(x, p["up"]), p["down"])
    return linear(act(linear(x, p["fc1"])), p["fc2"])


# --------------------------------------------------------------------------- MoE
def combine_mode(cfg):
    """moe.combine_weights with 'auto' spelled out: raw probabilities for top-1, else
    renormalised over the k chosen."""
    mode = cfg.get("combine_weights", "auto")
    if mode == "auto":
        return "softmax" if cfg.top_k == 1 else "renorm_chosen"
    return mode


def route(logits, k, noise=None, combine="renorm_chosen"):
    """Per token: first expert = argmax of logits, later ones = argmax of (logits + noise) over
    the experts not yet taken; weights = their softmax probabilities, divided by their sum for
    'renorm_chosen' (for 'renorm_kept' see `renorm_kept`, applied once drops are known)."""
    probs = softmax(logits)
    noisy = logits if noise is None else logits + noise
    ids = np.zeros(logits.shape[:-1] + (k,), np.int64)
    for idx in np.ndindex(*logits.shape[:-1]):
        taken = [int(np.argmax(logits[idx]))]
        for _ in range(1, k):
            scores = noisy[idx].copy()
            scores[taken] = -np.inf
            taken.append(int(np.argmax(scores)))
        ids[idx] = taken
    gates = np.take_along_axis(probs, ids, -1)
    if combine == "renorm_chosen":
        gates = gates / gates.sum(-1, keepdims=True)
    return ids, gates, probs


def renorm_kept(gates, kept):
    """Each token's kept gates over their sum; a token with none kept gets zeros."""
    out = np.zeros_like(gates)
    for idx in np.ndindex(*gates.shape[:-1]):
        total = sum(g for g, keep in zip(gates[idx], kept[idx], strict=True) if keep)
        if total > 0:
            out[idx] = np.where(kept[idx], gates[idx] / total, 0.0)
    return out


def capacity(tokens, num_experts, k, factor, min_capacity=0):
    return max(1, min_capacity, math.ceil(tokens / num_experts * (k * factor)))


def slots(ids, valid, num_experts, cap):
    """GShard order per routing group (row): every first choice in position order, then every
    second one. A pair takes the next free slot of its expert; pairs past `cap` are dropped;
    padding takes none.
    """
    batch, seq, k = ids.shape
    slot = np.full(ids.shape, -1)
    kept = np.zeros(ids.shape, bool)
    for b in range(batch):
        used = np.zeros(num_experts, int)
        for j in range(k):
            for s in range(seq):
                if not valid[b, s]:
                    continue
                e = ids[b, s, j]
                slot[b, s, j] = used[e]
                kept[b, s, j] = used[e] < cap
                used[e] += 1
    return slot, kept


def capacity_kept(ids, valid, cfg, train, groups=1):
    """Which (token, choice) pairs keep a slot. The routing groups are the rows
    (capacity_group 'sequence') or `groups` runs of whole rows flattened ('batch_shard')."""
    batch, seq, k = ids.shape
    if cfg.get("capacity_group", "sequence") == "sequence":
        groups = batch
    factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    tokens = batch * seq // groups
    cap = capacity(tokens, cfg.num_experts, k, factor, cfg.get("min_capacity", 0))
    kept = slots(ids.reshape(groups, tokens, k), valid.reshape(groups, tokens), cfg.num_experts,
                 cap)[1]
    return kept.reshape(ids.shape)


def balance_loss(probs, ids, valid, counts):
    num_experts = probs.shape[-1]
    p = probs[valid].mean(0)
    chosen = ids[valid][:, :1] if counts == "top1" else ids[valid]
    f = np.array([(chosen == e).sum() for e in range(num_experts)]) / chosen.size
    return num_experts * np.sum(f * p)


def z_loss(logits, valid):
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[..., None]).sum(-1))
    return np.mean(lse[valid] ** 2)


def expert_ffn(w, e, x, activation, gated):
    act = ACTIVATIONS[activation]
    if gated:
        return (act(x @ w["gate"][e]) * (x @ w["up"][e])) @ w["down"][e]
    return act(x @ w["fc1"][e] + w["fc1_bias"][e]) @ w["fc2"][e] + w["fc2_bias"][e]


def moe(params, x, valid, cfg, activation, gated, train=False):
    """(y [B, S, d_out], metrics) of the MoE FFN; the dispatch and factor come from `cfg`."""
    w = f64(params["experts"])
    x = np.asarray(x, np.float64)
    logits = x @ np.asarray(params["router"], np.float64)
    num_experts, k = cfg.num_experts, cfg.top_k
    mode = combine_mode(cfg)
    ids, weights, probs = route(logits, k, combine=mode)
    batch, seq, _ = x.shape
    if cfg.dispatch == "dropless":
        kept = np.broadcast_to(valid[..., None], ids.shape)
    else:
        kept = capacity_kept(ids, valid, cfg, train)
    if mode == "renorm_kept":
        weights = renorm_kept(weights, kept)
    d_out = (w["down"] if gated else w["fc2"]).shape[-1]
    y = np.zeros((batch, seq, d_out))
    for b, s, j in np.ndindex(batch, seq, k):
        if kept[b, s, j]:
            y[b, s] += weights[b, s, j] * expert_ffn(w, ids[b, s, j], x[b, s], activation, gated)
    pairs = valid.sum() * k
    entropy = -(probs * np.log(probs)).sum(-1)
    metrics = {
        "balance_loss": balance_loss(probs, ids, valid, cfg.balance_counts),
        "z_loss": z_loss(logits, valid),
        "expert_fraction": np.array([(ids[valid] == e).sum() for e in range(num_experts)]) / pairs,
        "dropped_fraction": 1 - kept.sum() / pairs,
        "router_entropy": entropy[valid].mean(),
    }
    return y, metrics


def layer_indices(spec, num_layers):
    """Which blocks are MoE: written out from the config documentation."""
    if spec == "every_other":
        return [i for i in range(num_layers) if i % 2 == 0]
    if spec == "all":
        return list(range(num_layers))
    if spec == "none":
        return []
    if spec == "first_half":
        return list(range(num_layers // 2))
    if spec == "second_half":
        return list(range(num_layers // 2, num_layers))
    return sorted({int(i) for i in spec.split(",")})  # '1,3'-style explicit indices


# --------------------------------------------------------------------------- model parts
def vit(params, images, model_cfg, train=False, image_valid=None):
    """images [n, H, W, 3] -> (hidden state `select_layer` [n, tokens, width], MoE metrics).

    MoE losses and metrics count only the tokens of images marked in `image_valid` [n].
    """
    v, p = model_cfg.vision, f64(params)
    n, size = images.shape[0], v.image_size
    grid, ps = size // v.patch_size, v.patch_size
    patches = np.zeros((n, grid * grid, ps * ps * 3))
    for b, r, c in np.ndindex(n, grid, grid):  # row-major patches, each flattened (y, x, channel)
        patches[b, r * grid + c] = images[b, r * ps : (r + 1) * ps, c * ps : (c + 1) * ps].ravel()
    kernel = p["patch_embed"]["kernel"].reshape(-1, v.width)
    x = patches @ kernel
    if v.patch_bias:
        x = x + p["patch_embed"]["bias"]
    if v.class_token:
        x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, v.width)), x], axis=1)
    x = x + p["pos_embed"]
    # HF hidden_states: [embeddings, block 0 output, ..., block depth-1 output].
    hidden = [layer_norm(x, p["pre_norm"], v.layer_norm_eps) if v.pre_norm else x]
    wanted = v.select_layer if v.select_layer >= 0 else v.depth + 1 + v.select_layer
    heads = v.num_heads
    moe_at = layer_indices(v.moe_layers, v.depth)
    everything = np.ones((n, x.shape[1], x.shape[1]), bool)
    metrics = {}
    for i in range(wanted):  # the blocks after the selected one play no part
        blk = p[f"layers_{i}"]
        x = hidden[-1]
        x = x + attention(blk["attn"], layer_norm(x, blk["norm1"], v.layer_norm_eps), heads,
                          heads, everything)
        h = layer_norm(x, blk["norm2"], v.layer_norm_eps)
        if i in moe_at:
            valid = np.ones(h.shape[:2], bool)
            if image_valid is not None:
                valid &= np.asarray(image_valid, bool)[:, None]
            y, metrics[f"vision/layers_{i}"] = moe(
                blk["moe"], h, valid, model_cfg.moe, v.activation, False, train
            )
        else:
            y = dense_ffn(blk["mlp"], h, v.activation, gated=False)
        hidden.append(x + y)
    out = hidden[wanted]
    if v.class_token and not v.keep_class_token:
        out = out[:, 1:]
    return out, metrics


def projector(params, x, model_cfg, train=False, image_valid=None):
    p = f64(params)
    if model_cfg.projector.kind == "linear":
        return linear(x, p["fc"]), {}
    if model_cfg.projector.moe:
        valid = np.ones(x.shape[:2], bool)
        if image_valid is not None:
            valid &= np.asarray(image_valid, bool)[:, None]
        y, m = moe(p["moe"], x, valid, model_cfg.moe, "gelu", False, train)
        return y, {"projector": m}
    return dense_ffn(p["mlp"], x, "gelu", gated=False), {}


def decoder(params, ids, positions, segment_ids, features, model_cfg, packed=False, train=False):
    """Token ids [batch, seq] -> (logits [batch, seq, vocab], MoE metrics).

    The j-th image placeholder of row b takes features[b, j].
    """
    d, p = model_cfg.decoder, f64(params)
    batch, seq = ids.shape
    x = p["embedding"][ids]
    if features is not None:
        for b in range(batch):
            j = 0
            for s in range(seq):
                if ids[b, s] == model_cfg.image_token_id:
                    x[b, s] = features[b, j]
                    j += 1
    causal = np.tril(np.ones((seq, seq), bool))[None]
    allowed = np.broadcast_to(causal, (batch, seq, seq))
    if packed:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & same & (segment_ids[:, None, :] > 0)
    valid = segment_ids > 0
    moe_at = layer_indices(d.moe_layers, d.num_layers)
    qk_eps = d.norm_eps if d.qk_norm else None
    metrics = {}
    for i in range(d.num_layers):
        blk = p[f"layers_{i}"]
        h = rms_norm(x, blk["attn_norm"], d.norm_eps)
        x = x + attention(blk["attn"], h, d.num_heads, d.num_kv_heads, allowed, positions,
                          d.rope_theta, qk_eps)
        h = rms_norm(x, blk["ffn_norm"], d.norm_eps)
        if i in moe_at:
            y, metrics[f"decoder/layers_{i}"] = moe(
                blk["moe"], h, valid, model_cfg.moe, "silu", True, train
            )
        else:
            y = dense_ffn(blk["mlp"], h, "silu", gated=True)
        x = x + y
    x = rms_norm(x, p["final_norm"], d.norm_eps)
    head = p["embedding"].T if d.tie_embeddings else p["lm_head"]
    return x @ head, metrics


def lvlm(params, input_ids, positions, segment_ids, images, model_cfg, packed=False, train=False):
    """The whole model: images [batch, M, H, W, 3] or None. Returns (logits, metrics).

    Image j of row b is used when the row has more than j * (tokens per image) placeholders; the
    others count in no MoE loss or metric.
    """
    features, metrics = None, {}
    if images is not None:
        b, m = images.shape[:2]
        flat = np.asarray(images, np.float64).reshape(b * m, *images.shape[2:])
        v = model_cfg.vision
        per_image = (v.image_size // v.patch_size) ** 2 + int(v.class_token and v.keep_class_token)
        used = np.zeros((b, m), bool)
        for row in range(b):
            count = int((input_ids[row] == model_cfg.image_token_id).sum())
            used[row, : -(-count // per_image)] = True
        used = used.reshape(b * m)
        vision, metrics = vit(params["vision"], flat, model_cfg, train, used)
        features, proj_metrics = projector(params["projector"], vision, model_cfg, train, used)
        features = features.reshape(b, -1, features.shape[-1])
        metrics.update(proj_metrics)
    logits, dec_metrics = decoder(
        params["decoder"], input_ids, positions, segment_ids, features, model_cfg, packed, train
    )
    metrics.update(dec_metrics)
    return logits, metrics
