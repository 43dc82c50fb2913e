"""Obviously-correct reference computations shared by several test files."""

from __future__ import annotations

import math

import torch


def naive_bilinear(image, x, y):
    """align_corners=False bilinear sample with zero padding; image (H, W), x, y in [0, 1]."""
    height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                value += wy * wx * float(image[yy, xx])
    return value


def naive_sliding_windows(num_frames, clip_len, step=3):
    """Window t predicts frame t: frames t-(T-1)*step, ..., t-step, t, those before 0 -> 0."""
    windows = []
    for t in range(num_frames):
        window = []
        for back in range(clip_len - 1, -1, -1):
            window.append(max(0, t - back * step))
        windows.append(window)
    return windows


def match_one_set(matcher, class_logits, mask_logits, targets):
    """``HungarianMatcher.match_sets`` on one prediction set: one ``MatchIndices`` per clip."""
    return matcher.match_sets([(class_logits, mask_logits)], targets).matches[0]


def naive_attention(attn, query, key, value, blocked=None, keep=None):
    """query (N, C), key/value (S, C), blocked (N, S) bool, keep (heads, N, S) factors for the
    attention weights (dropout) → (N, C); loops over heads."""
    dim = query.shape[-1]
    head_dim = dim // attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = query @ w[:dim].T + b[:dim]
    k = key @ w[dim : 2 * dim].T + b[dim : 2 * dim]
    v = value @ w[2 * dim :].T + b[2 * dim :]
    out = torch.zeros_like(q)
    for head in range(attn.num_heads):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        weights = scores.softmax(dim=-1)
        if keep is not None:
            weights = weights * keep[head]
        out[:, cols] = weights @ v[:, cols]
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def load_checkpoint(path):
    """A training checkpoint read as the trainer reads it: on CPU, unpickled weights-only."""
    return torch.load(path, map_location="cpu", weights_only=True)
