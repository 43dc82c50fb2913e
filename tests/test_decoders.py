"""Transformer decoders against naive re-computations written out loop by loop here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from naive import naive_attention

from themask.modeling.temporal_decoder import TemporalAggregation, TemporalDecoder
from themask.modeling.transformer import (
    CrossAttentionLayer,
    MaskDecoder,
    MultiHeadAttention,
    allowed_positions,
    resize_features,
)

DIM, HEADS, QUERIES, CLASSES = 16, 2, 5, 3


# ----------------------------------------------------------------------------- naive pieces
def layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def naive_ffn(x, ffn):
    hidden = torch.relu(x @ ffn.linear1.weight.T + ffn.linear1.bias)
    return layer_norm(x + hidden @ ffn.linear2.weight.T + ffn.linear2.bias, ffn.norm)


def naive_head(queries, head):
    """queries (N, C) → class logits (N, K+1), mask embeddings (N, D)."""
    x = layer_norm(queries, head.norm)
    logits = x @ head.class_embed.weight.T + head.class_embed.bias
    layers = head.mask_embed.layers
    for index, layer in enumerate(layers):
        x = x @ layer.weight.T + layer.bias
        if index < len(layers) - 1:
            x = torch.relu(x)
    return logits, x


def naive_position(frames, height, width, dim):
    """3-D sine encoding from its closed form → (T, h·w, C)."""
    half = dim // 2
    pos = torch.zeros(frames, height, width, dim)
    for t in range(frames):
        for y in range(height):
            for x in range(width):
                zn = (t + 1) / (frames + 1e-6) * 2 * math.pi
                yn = (y + 1) / (height + 1e-6) * 2 * math.pi
                xn = (x + 1) / (width + 1e-6) * 2 * math.pi
                for i in range(dim):
                    angle_z = zn / 10000 ** (2 * (i // 2) / dim)
                    value_z = math.sin(angle_z) if i % 2 == 0 else math.cos(angle_z)
                    j = i % half
                    coord = yn if i < half else xn
                    angle = coord / 10000 ** (2 * (j // 2) / half)
                    pos[t, y, x, i] = (math.sin(angle) if j % 2 == 0 else math.cos(angle)) + value_z
    return pos.flatten(1, 2)


def blocked_from_masks(masks, size):
    """masks (N, H, W) full-resolution logits → blocked (N, h·w) (docs/DESIGN.md §4.1)."""
    low = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
    blocked = low.sigmoid().flatten(1) < 0.5
    blocked[blocked.all(dim=1)] = False
    return blocked


def naive_layer(layer, queries, query_pos, memory, memory_pos, blocked):
    x = queries
    attn = naive_attention(
        layer.cross_attn.attn, x + query_pos, memory + memory_pos, memory, blocked
    )
    x = layer_norm(x + attn, layer.cross_attn.norm)
    attn = naive_attention(layer.self_attn.attn, x + query_pos, x + query_pos, x)
    x = layer_norm(x + attn, layer.self_attn.norm)
    return naive_ffn(x, layer.ffn)


def random_inputs(frames_total, seed=0, size=(16, 24)):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    mask_features = torch.randn(frames_total, DIM, height, width, generator=generator)
    levels = [(height // 8, width // 8), (height // 4, width // 4), (height // 2, width // 2)]
    multi_scale = [torch.randn(frames_total, DIM, h, w, generator=generator) for h, w in levels]
    return mask_features, multi_scale


def memory_of(decoder, multi_scale, frame, frames):
    """Memory of frame index ``frame`` (on the B·T axis) inside a T-frame clip, per level."""
    out = []
    for level, features in enumerate(multi_scale):
        _, _, h, w = features.shape
        values = features[frame].flatten(1).T + decoder.level_embed.weight[level]
        pos = naive_position(frames, h, w, DIM)[frame % frames]
        out.append((values, pos, (h, w)))
    return out


# ----------------------------------------------------------------------------- attention
def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=DIM, num_heads=HEADS)
    query, key, value = torch.randn(3, 2, 7, DIM).unbind(0)
    allowed = torch.rand(2, 7, 7) > 0.4
    allowed[:, :, 0] = True  # no fully blocked row: torch would return NaN there
    blocked_per_head = (~allowed).repeat_interleave(HEADS, dim=0)
    expected = torch.nn.MultiheadAttention.forward(
        attn, query, key, value, attn_mask=blocked_per_head, need_weights=False
    )[0]
    assert torch.allclose(attn(query, key, value, allowed), expected, atol=1e-5)


def test_masked_attention_blocks_exactly_the_blocked_positions():
    torch.manual_seed(1)
    layer = CrossAttentionLayer(dim=DIM, num_heads=HEADS)
    queries = torch.randn(1, 4, DIM)
    query_pos = torch.randn(1, 4, DIM)
    values = torch.randn(1, 6, DIM)
    keys = values + torch.randn(1, 6, DIM)
    logits = torch.tensor(
        [
            [
                [2.0, -1.0, 0.5, -3.0, -0.1, 1.0],  # blocks 1, 3, 4
                [-1.0, -2.0, -0.5, -3.0, -0.2, -4.0],  # fully blocked → unblocked
                [-1.0, -1.0, -1.0, -1.0, -1.0, 3.0],  # only 5 allowed
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ]
        ]
    )  # sigmoid(0) = 0.5: allowed
    allowed = allowed_positions(logits)
    expected_allowed = torch.tensor(
        [[[1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected_allowed)

    out = layer(queries, keys, values, query_pos=query_pos, allowed=allowed)
    for row in range(4):
        blocked = ~expected_allowed[0, row]
        attn = naive_attention(
            layer.attn,
            queries[0, row : row + 1] + query_pos[0, row : row + 1],
            keys[0],
            values[0],
            blocked[None],
        )
        expected = layer_norm(queries[0, row] + attn[0], layer.norm)
        assert torch.allclose(out[0, row], expected, atol=1e-5)

    # changing memory at blocked positions leaves the queries that block them unchanged
    changed_keys, changed_values = keys.clone(), values.clone()
    changed_keys[0, [1, 3, 4]] += 5.0
    changed_values[0, [1, 3, 4]] -= 5.0
    out2 = layer(queries, changed_keys, changed_values, query_pos=query_pos, allowed=allowed)
    assert torch.allclose(out2[0, 0], out[0, 0], atol=1e-6)
    assert torch.allclose(out2[0, 2], out[0, 2], atol=1e-6)
    assert not torch.allclose(out2[0, 1], out[0, 1], atol=1e-3)  # unblocked row sees all


def test_attention_mask_from_resized_features_equals_resized_masks():
    torch.manual_seed(2)
    features = torch.randn(2, DIM, 24, 40)
    embeddings = torch.randn(2, QUERIES, DIM)
    full = torch.einsum("fnc,fchw->fnhw", embeddings, features)
    sizes = [(3, 5), (6, 10), (12, 20), (24, 40)]
    for size, resized in zip(sizes, resize_features(features, sizes)):
        direct = F.interpolate(full, size=size, mode="bilinear", align_corners=False).flatten(2)
        via_features = torch.einsum("fnc,fchw->fnhw", embeddings, resized).flatten(2)
        assert torch.allclose(direct, via_features, atol=1e-4)
        clear = direct.abs() > 1e-3  # away from the threshold both must agree exactly
        assert torch.equal(allowed_positions(direct)[clear], allowed_positions(via_features)[clear])


# ----------------------------------------------------------------------------- aggregation
def test_temporal_aggregation_equals_hand_formula():
    module = TemporalAggregation(dim=4, num_heads=1, ffn_dim=8, dropout=0.1).eval()
    with torch.no_grad():
        module.time_score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        module.time_score.bias.fill_(0.5)
        module.time_value.weight.copy_(torch.eye(4) * 2)
        module.time_value.bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))
    clip = torch.tensor([[[0.5, -1.0, 2.0, 0.0]]])  # (B=1, N=1, C=4)
    frames = torch.tensor(
        [[[[0.0, 1.0, 0.0, 1.0]], [[math.log(3.0), 0.0, 2.0, 0.0]]]]
    )  # (1, 2, 1, 4)
    # scores 0.5 and log 3 + 0.5 → weights 1/4 and 3/4
    value0 = torch.tensor([1.0, 2.0, 0.0, 1.0])
    value1 = torch.tensor([2 * math.log(3.0) + 1.0, 0.0, 4.0, -1.0])
    aggregated = 0.25 * value0 + 0.75 * value1
    expected = naive_ffn(layer_norm(clip[0, 0] + aggregated, module.norm), module.ffn)
    assert torch.allclose(module(clip, frames)[0, 0], expected, atol=1e-5)


# ----------------------------------------------------------------------------- decoders
def test_mask_decoder_equals_naive_forward():
    torch.manual_seed(3)
    decoder = MaskDecoder(
        num_classes=CLASSES,
        num_queries=QUERIES,
        dim=DIM,
        mask_dim=DIM,
        num_heads=HEADS,
        ffn_dim=32,
        num_layers=4,
    )
    mask_features, multi_scale = random_inputs(2)
    predictions = decoder(mask_features, multi_scale, frames=1)
    assert len(predictions.clip) == 5 and predictions.frame is None
    assert predictions.frames_per_clip == 1
    with torch.no_grad():
        for frame in range(2):  # every frame is its own clip
            memory = memory_of(decoder, multi_scale, frame, frames=1)
            queries = decoder.query_feat.weight
            qpos = decoder.query_pos.weight
            blocked = None  # set by the head before layer 1
            for index in range(5):
                if index > 0:
                    values, pos, size = memory[(index - 1) % 3]
                    queries = naive_layer(
                        decoder.layers[index - 1], queries, qpos, values, pos, blocked
                    )
                logits, embeddings = naive_head(queries, decoder.clip_head)
                masks = torch.einsum("nc,chw->nhw", embeddings, mask_features[frame])
                blocked = blocked_from_masks(masks, memory[index % 3][2])
                got = predictions.clip[index]
                assert got.class_logits.shape == (2, QUERIES, CLASSES + 1)
                assert got.mask_logits.shape == (2, QUERIES, 1, 16, 24)
                assert torch.allclose(got.class_logits[frame], logits, atol=1e-4)
                assert torch.allclose(got.mask_logits[frame, :, 0], masks, atol=1e-4)
    final_only = decoder(mask_features, multi_scale, frames=2, return_all=False)
    assert len(final_only.clip) == 1 and final_only.frames_per_clip == 2
    # two frames of one clip are still decoded as two one-frame clips (same values up to the
    # summation order oneDNN picks for the batch shape: 5e-7 on torch 2.6, 0 on 2.13)
    final_masks, last_masks = final_only.clip[0].mask_logits, predictions.clip[-1].mask_logits
    assert torch.allclose(final_masks, last_masks, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3])
def test_temporal_decoder_equals_naive_forward(frames):
    torch.manual_seed(4)
    decoder = TemporalDecoder(
        num_classes=CLASSES,
        num_queries=QUERIES,
        dim=DIM,
        mask_dim=DIM,
        num_heads=HEADS,
        ffn_dim=32,
        num_layers=3,
        tad_ffn_dim=24,
    ).eval()
    batch = 2
    mask_features, multi_scale = random_inputs(batch * frames, seed=5)
    predictions = decoder(mask_features, multi_scale, frames=frames, return_all=True)
    assert predictions.frames_per_clip == frames
    temporal = decoder.temporal
    with torch.no_grad():
        for clip_index in range(batch):
            rows = [clip_index * frames + t for t in range(frames)]
            memory = [memory_of(decoder, multi_scale, row, frames) for row in rows]
            feats = mask_features[rows]  # (T, C, H, W)
            qf, qpos = decoder.query_feat.weight, decoder.query_pos.weight
            # start: clip queries by self-attention; frame queries by self- then cross-attention
            attn = naive_attention(temporal.clip_self_attn.attn, qf + qpos, qf + qpos, qf)
            clip = layer_norm(qf + attn, temporal.clip_self_attn.norm)
            attn = naive_attention(temporal.frame_self_attn.attn, qf + qpos, qf + qpos, qf)
            shared = layer_norm(qf + attn, temporal.frame_self_attn.norm)
            frame_queries = []
            for t in range(frames):
                values = torch.cat([m[0] for m in memory[t]])
                keys = values + torch.cat([m[1] for m in memory[t]])
                attn = naive_attention(temporal.frame_cross_attn.attn, shared + qpos, keys, values)
                x = layer_norm(shared + attn, temporal.frame_cross_attn.norm)
                frame_queries.append(naive_ffn(x, temporal.frame_ffn))
            blocked = None  # set by the clip head before layer 1
            for index in range(4):
                if index > 0:
                    level = (index - 1) % 3
                    frame_queries = [
                        naive_layer(
                            decoder.layers[index - 1],
                            frame_queries[t],
                            qpos,
                            memory[t][level][0],
                            memory[t][level][1],
                            blocked[t],
                        )
                        for t in range(frames)
                    ]
                    stacked = torch.stack(frame_queries)  # (T, N, C)
                    scores = stacked @ temporal.time_score.weight.T + temporal.time_score.bias
                    weights = scores.softmax(dim=0)  # over time
                    transformed = stacked @ temporal.time_value.weight.T + temporal.time_value.bias
                    clip = layer_norm(clip + (weights * transformed).sum(0), temporal.norm)
                    clip = naive_ffn(clip, temporal.ffn)
                logits, embeddings = naive_head(clip, decoder.clip_head)
                masks = torch.einsum("nc,tchw->nthw", embeddings, feats)
                size = memory[0][index % 3][2]
                blocked = [blocked_from_masks(masks[:, t], size) for t in range(frames)]
                got = predictions.clip[index]
                assert torch.allclose(got.class_logits[clip_index], logits, atol=1e-4)
                assert torch.allclose(got.mask_logits[clip_index], masks, atol=1e-4)
                got_frame = predictions.frame[index]
                assert got_frame.class_logits.shape == (batch, frames, QUERIES, CLASSES + 1)
                assert got_frame.mask_logits.shape == (batch, QUERIES, frames, 16, 24)
                for t in range(frames):
                    frame_logits, frame_embeddings = naive_head(
                        frame_queries[t], decoder.frame_head
                    )
                    frame_masks = torch.einsum("nc,chw->nhw", frame_embeddings, feats[t])
                    assert torch.allclose(
                        got_frame.class_logits[clip_index, t], frame_logits, atol=1e-4
                    )
                    assert torch.allclose(
                        got_frame.mask_logits[clip_index, :, t], frame_masks, atol=1e-4
                    )


def test_stage1_state_dict_loads_into_temporal_decoder_by_name():
    args = dict(
        num_classes=CLASSES,
        num_queries=QUERIES,
        dim=DIM,
        mask_dim=DIM,
        num_heads=HEADS,
        ffn_dim=32,
        num_layers=3,
    )
    single = MaskDecoder(**args)
    temporal = TemporalDecoder(**args, tad_ffn_dim=24)
    result = temporal.load_state_dict(single.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        key.startswith(("temporal.", "frame_head.")) for key in result.missing_keys
    )
    for key, value in single.state_dict().items():
        assert torch.equal(temporal.state_dict()[key], value)
