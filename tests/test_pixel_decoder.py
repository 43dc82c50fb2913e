"""Pixel decoder: shapes, level order, FPN wiring and a token-by-token reference encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from themask.modeling.outputs import FrameFeatures
from themask.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from themask.modeling.position_encoding import sine_position_encoding_2d

TINY = dict(
    in_channels=(8, 16, 24, 32),
    conv_dim=16,
    mask_dim=12,
    num_layers=1,
    num_heads=2,
    num_points=2,
    ffn_dim=24,
    norm_groups=4,
)


def backbone_maps(batch, sizes, channels=TINY["in_channels"], seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, h, w, generator=gen, dtype=dtype)
        for c, (h, w) in zip(channels, sizes)
    ]


# A 97×131 image through the MiT strides (conv 7/4/3, then 3/2/1 three times).
ODD_SIZES = [(25, 33), (13, 17), (7, 9), (4, 5)]


def test_output_shapes_on_odd_sizes():
    decoder = MSDeformAttnPixelDecoder(**{**TINY, "num_layers": 2})
    out = decoder(backbone_maps(3, ODD_SIZES))
    assert out.mask_features.shape == (3, 12, 25, 33)
    assert [tuple(x.shape) for x in out.multi_scale] == [
        (3, 16, 4, 5),
        (3, 16, 7, 9),
        (3, 16, 13, 17),
    ]
    assert isinstance(out, FrameFeatures) and len(out) == 3 and len(out.multi_scale) == 3


def test_without_encoder_layers_levels_come_back_in_order_res5_res4_res3():
    decoder = MSDeformAttnPixelDecoder(**{**TINY, "num_layers": 0})
    maps = backbone_maps(2, ODD_SIZES)
    out = decoder(maps)
    for proj, level_map, feature in zip(decoder.input_proj, out.multi_scale, maps[::-1]):
        torch.testing.assert_close(level_map, proj(feature))


def test_fpn_step_fuses_the_stride_8_map():
    decoder = MSDeformAttnPixelDecoder(**TINY)
    maps = backbone_maps(2, ODD_SIZES)
    seen = {}
    decoder.fpn_output.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    out = decoder(maps)
    lateral = decoder.lateral(maps[0])
    for level, should_match in ((2, True), (1, False), (0, False)):
        up = F.interpolate(
            out.multi_scale[level], size=(25, 33), mode="bilinear", align_corners=False
        )
        assert torch.allclose(seen["x"], lateral + up, atol=1e-6) == should_match
    torch.testing.assert_close(
        out.mask_features, decoder.mask_features(decoder.fpn_output(seen["x"]))
    )


def tent_sample(image, x, y):
    """Bilinear sample of image (D, H, W) at normalised (x, y), zero outside, written as a sum of
    tent weights max(0, 1 - |distance to pixel centre|) over every pixel."""
    _, height, width = image.shape
    wy = (1 - (y * height - 0.5 - torch.arange(height, dtype=image.dtype)).abs()).clamp(min=0)
    wx = (1 - (x * width - 0.5 - torch.arange(width, dtype=image.dtype)).abs()).clamp(min=0)
    return (image * wy[:, None] * wx[None, :]).sum(dim=(1, 2))


def reference_encoder_layer(layer, level_maps, level_embed):
    """One encoder layer, token by token. level_maps: list of (C, H, W), lowest resolution first."""
    attn = layer.self_attn
    heads, points = attn.num_heads, attn.num_points
    dim = level_maps[0].shape[0]
    head_dim = dim // heads
    tokens, queries, centres = [], [], []
    for lvl, fmap in enumerate(level_maps):
        _, h, w = fmap.shape
        pos = sine_position_encoding_2d(h, w, num_feats=dim // 2, dtype=fmap.dtype)
        for i in range(h):
            for j in range(w):
                tokens.append(fmap[:, i, j])
                queries.append(fmap[:, i, j] + pos[:, i, j] + level_embed[lvl])
                centres.append(((j + 0.5) / w, (i + 0.5) / h))
    values = [attn.value_proj(t) for t in tokens]
    # per level, per head: the projected value map (head_dim, H, W)
    value_maps, start = [], 0
    for fmap in level_maps:
        _, h, w = fmap.shape
        block = torch.stack(values[start : start + h * w]).t().reshape(dim, h, w)
        value_maps.append(block.reshape(heads, head_dim, h, w))
        start += h * w
    outputs = []
    for token, query, (cx, cy) in zip(tokens, queries, centres):
        offsets = attn.sampling_offsets(query).view(heads, len(level_maps), points, 2)
        logits = attn.attention_weights(query).view(heads, -1)
        weights = logits.softmax(-1).view(heads, len(level_maps), points)
        heads_out = []
        for m in range(heads):
            acc = torch.zeros(head_dim, dtype=token.dtype)
            for lvl, fmap in enumerate(level_maps):
                _, h, w = fmap.shape
                for p in range(points):
                    x = cx + offsets[m, lvl, p, 0] / w
                    y = cy + offsets[m, lvl, p, 1] / h
                    acc = acc + weights[m, lvl, p] * tent_sample(value_maps[lvl][m], x, y)
            heads_out.append(acc)
        src = layer.norm1(token + attn.output_proj(torch.cat(heads_out)))
        outputs.append(layer.norm2(src + layer.linear2(torch.relu(layer.linear1(src)))))
    # back to maps
    result, start = [], 0
    for fmap in level_maps:
        _, h, w = fmap.shape
        result.append(torch.stack(outputs[start : start + h * w]).t().reshape(dim, h, w))
        start += h * w
    return result


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_encoder_and_fpn_match_token_by_token_reference(layout):
    # Either memory layout of the backbone maps (MiT's are channels-last views) gives the same.
    torch.manual_seed(0)
    decoder = MSDeformAttnPixelDecoder(**TINY).double()
    attn = decoder.encoder_layers[0].self_attn
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)  # queries move the points
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.3)
    sizes = [(10, 18), (5, 9), (3, 5), (2, 3)]
    maps = backbone_maps(1, sizes, dtype=torch.float64, seed=3)
    out = decoder([m.contiguous(memory_format=layout) for m in maps])
    with torch.no_grad():
        level_maps = [proj(x)[0] for proj, x in zip(decoder.input_proj, maps[::-1])]
        expected = reference_encoder_layer(
            decoder.encoder_layers[0], level_maps, decoder.level_embed
        )
        for got, want in zip(out.multi_scale, expected):
            torch.testing.assert_close(got[0], want, rtol=1e-9, atol=1e-9)
        up = F.interpolate(expected[2][None], size=(10, 18), mode="bilinear", align_corners=False)
        fused = decoder.fpn_output(decoder.lateral(maps[0]) + up)
        torch.testing.assert_close(out.mask_features, decoder.mask_features(fused))


def test_gradients_reach_every_parameter_and_input():
    decoder = MSDeformAttnPixelDecoder(**TINY)
    # At initialisation the query (hence level_embed) does not move the sampling points yet.
    torch.nn.init.normal_(decoder.encoder_layers[0].self_attn.sampling_offsets.weight, std=0.1)
    maps = [m.requires_grad_() for m in backbone_maps(2, ODD_SIZES)]
    out = decoder(maps)
    loss = out.mask_features.square().mean() + sum(x.square().mean() for x in out.multi_scale)
    loss.backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(m.grad.abs().sum() > 0 for m in maps)


def test_default_size_matches_official_parameter_count():
    # Sum of the shapes of `decode_head.pixel_decoder.*` in the official MiT-B1 checkpoint key
    # list (tests/data/official_keys_mit_b1_t1.txt), counted independently of this code.
    decoder = MSDeformAttnPixelDecoder(in_channels=(64, 128, 320, 512))
    assert sum(p.numel() for p in decoder.parameters()) == 5_315_008
    assert decoder.level_embed.shape == (3, 256)
    layer = decoder.encoder_layers[0]
    assert layer.self_attn.sampling_offsets.weight.shape == (192, 256)
    assert layer.self_attn.attention_weights.weight.shape == (96, 256)
    assert decoder.lateral[0].bias is None and decoder.fpn_output[0].bias is None


def test_clear_errors_for_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="norm_groups"):
        MSDeformAttnPixelDecoder(**{**TINY, "norm_groups": 5})
    with pytest.raises(ValueError, match="4 backbone stages"):
        MSDeformAttnPixelDecoder(**{**TINY, "in_channels": (8, 16, 24)})
    decoder = MSDeformAttnPixelDecoder(**TINY)
    with pytest.raises(ValueError, match="in_channels"):
        decoder(backbone_maps(1, ODD_SIZES, channels=(8, 16, 24, 33)))
    with pytest.raises(ValueError, match="4 feature maps"):
        decoder(backbone_maps(1, ODD_SIZES)[1:])


def test_frames_of_a_batch_are_decoded_independently():
    decoder = MSDeformAttnPixelDecoder(**{**TINY, "num_layers": 2})
    torch.nn.init.normal_(decoder.encoder_layers[0].self_attn.sampling_offsets.weight, std=0.3)
    maps = backbone_maps(3, ODD_SIZES, seed=5)
    together = decoder(maps)
    for b in range(3):
        alone = decoder([m[b : b + 1] for m in maps])
        torch.testing.assert_close(alone.mask_features, together.mask_features[b : b + 1])
        for x, y in zip(alone.multi_scale, together.multi_scale):
            torch.testing.assert_close(x, y[b : b + 1])
