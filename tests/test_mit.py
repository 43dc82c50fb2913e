"""MiT backbone: parity with a naive re-implementation, shapes, variants."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from themask.modeling.mit import MIT_VARIANTS, MixTransformer, build_mit

REFERENCE = Path(__file__).parent / "data" / "official_keys_mit_b1_t1.txt"

TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _depthwise3x3(x, weight, bias):
    """x (N, C, H, W); 9 shifted sums instead of a grouped conv."""
    _, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            tap = weight[:, 0, dy, dx][None, :, None, None]
            out += padded[:, :, dy : dy + h, dx : dx + w] * tap
    return out + bias[None, :, None, None]


def _spatial_reduction(x, weight, bias, r):
    """x (N, C, H, W) → (N, C, H//r, W//r) by explicit non-overlapping patches."""
    n, c, h, w = x.shape
    hr, wr = h // r, w // r
    out = torch.zeros(n, weight.shape[0], hr, wr, dtype=x.dtype)
    for i in range(hr):
        for j in range(wr):
            patch = x[:, :, i * r : (i + 1) * r, j * r : (j + 1) * r]  # (N, C, r, r)
            out[:, :, i, j] = torch.einsum("ncyx,ocyx->no", patch, weight) + bias
    return out


def naive_mit(sd, x, *, depths, num_heads, sr_ratios=(8, 4, 2, 1)):
    """Straightforward MiT forward from a state dict in our naming (original eps values)."""
    outputs = []
    for s in range(4):
        p = f"stages.{s}"
        k, stride = (7, 4) if s == 0 else (3, 2)
        x = F.conv2d(
            x,
            sd[f"{p}.patch_embed.proj.weight"],
            sd[f"{p}.patch_embed.proj.bias"],
            stride=stride,
            padding=k // 2,
        )
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = _layer_norm(
            tokens, sd[f"{p}.patch_embed.norm.weight"], sd[f"{p}.patch_embed.norm.bias"], 1e-5
        )
        heads, d = num_heads[s], c // num_heads[s]
        for j in range(depths[s]):
            b = f"{p}.blocks.{j}"
            y = _layer_norm(tokens, sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], 1e-6)
            q = _linear(y, sd, f"{b}.attn.q")
            if sr_ratios[s] > 1:
                grid = y.transpose(1, 2).reshape(n, c, h, w)
                red = _spatial_reduction(
                    grid, sd[f"{b}.attn.sr.weight"], sd[f"{b}.attn.sr.bias"], sr_ratios[s]
                )
                mem = _layer_norm(
                    red.flatten(2).transpose(1, 2),
                    sd[f"{b}.attn.sr_norm.weight"],
                    sd[f"{b}.attn.sr_norm.bias"],
                    1e-5,
                )
            else:
                mem = y
            kv = _linear(mem, sd, f"{b}.attn.kv")
            key, value = kv[..., :c], kv[..., c:]
            head_outs = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                logits = q[..., sl] @ key[..., sl].transpose(1, 2) / math.sqrt(d)
                head_outs.append(torch.softmax(logits, -1) @ value[..., sl])
            tokens = tokens + _linear(torch.cat(head_outs, -1), sd, f"{b}.attn.proj")
            y = _layer_norm(tokens, sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], 1e-6)
            hidden = _linear(y, sd, f"{b}.mlp.fc1")
            grid = hidden.transpose(1, 2).reshape(n, -1, h, w)
            grid = _depthwise3x3(grid, sd[f"{b}.mlp.dwconv.weight"], sd[f"{b}.mlp.dwconv.bias"])
            hidden = _gelu(grid.flatten(2).transpose(1, 2))
            tokens = tokens + _linear(hidden, sd, f"{b}.mlp.fc2")
        tokens = _layer_norm(tokens, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"], 1e-6)
        x = tokens.transpose(1, 2).reshape(n, c, h, w)
        outputs.append(x)
    return outputs


def _randomise(model, seed=0):
    """Non-trivial norms and biases so every parameter influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name:
                param.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
    return model


@pytest.mark.parametrize("size", [(37, 45), (64, 64)])
def test_matches_naive_implementation(size):
    torch.manual_seed(0)
    model = _randomise(MixTransformer(**TINY)).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(x)  # without autograd the MLP's GELU runs in place
    with torch.enable_grad():
        recorded = model(x)
    assert all(torch.equal(a, b) for a, b in zip(ours, recorded))
    expected = naive_mit(sd, x, depths=TINY["depths"], num_heads=TINY["num_heads"])
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        assert a.is_contiguous(memory_format=torch.channels_last)  # a view of the tokens
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_layer_norm_eps_is_the_original_one():
    """Changing one eps (1e-6 ↔ 1e-5) must be visible in float64: the naive check is sensitive."""
    torch.manual_seed(1)
    model = _randomise(MixTransformer(**TINY)).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)[-1]
        model.stages[0].blocks[0].norm1.eps = 1e-5
        changed = model(x)[-1]
    assert (reference - changed).abs().max() > 1e-9
    assert model.stages[0].patch_embed.norm.eps == 1e-5
    assert model.stages[0].blocks[0].attn.sr_norm.eps == 1e-5
    assert model.stages[3].norm.eps == 1e-6 and model.stages[3].blocks[0].norm2.eps == 1e-6


@pytest.mark.parametrize("size", [(97, 131), (33, 31), (32, 35), (480, 853)])
def test_feature_shapes_round_up(size):
    model = MixTransformer(embed_dims=(4, 8, 8, 8), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    with torch.no_grad():
        features = model(torch.zeros(1, 3, *size))
    assert model.strides == (4, 8, 16, 32)
    for feature, stride, channels in zip(features, model.strides, model.out_channels):
        expected = (1, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert feature.shape == expected


def test_drop_path_rates_increase_linearly_and_eval_is_deterministic():
    model = MixTransformer(**TINY, drop_path_rate=0.5)
    rates = [block.drop_path_rate for stage in model.stages for block in stage.blocks]
    expected = [0.5 * i / (len(rates) - 1) for i in range(len(rates))]
    assert rates == pytest.approx(expected)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        c = model(x)[-1]
    assert not torch.allclose(a, c)


def test_build_mit_variants_and_overrides():
    assert set(MIT_VARIANTS) == {f"mit_b{i}" for i in range(6)}
    tiny = build_mit("mit_b3", embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), num_heads=None)
    assert tiny.out_channels == (8, 16, 40, 64) and tiny.depths == (1, 1, 1, 1)
    assert [s.blocks[0].attn.num_heads for s in tiny.stages] == [1, 2, 5, 8]
    with pytest.raises(ValueError, match="mit_b9"):
        build_mit("mit_b9")
    with pytest.raises(ValueError, match="depths"):
        MixTransformer(embed_dims=(8, 16, 24, 32), depths=(1, 1), num_heads=(1, 2, 3, 4))


def _reference_backbone_numel():
    total = 0
    for line in REFERENCE.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith("backbone."):
            total += math.prod(int(v) for v in shape.strip("()").split(",") if v.strip())
    return total


def test_b1_parameter_count_equals_official_backbone():
    model = build_mit("mit_b1")
    assert sum(p.numel() for p in model.parameters()) == _reference_backbone_numel()


def test_b0_b5_channels_and_depths():
    b0 = build_mit("mit_b0")
    assert b0.out_channels == (32, 64, 160, 256)
    assert [len(s.blocks) for s in b0.stages] == [2, 2, 2, 2]
    assert MIT_VARIANTS["mit_b5"]["depths"] == (3, 6, 40, 3)
