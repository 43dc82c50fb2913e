"""Deformable attention against a slow, loop-based reference with manual bilinear sampling."""

from __future__ import annotations

import math

import pytest
import torch

from themask.modeling.ms_deform_attn import MSDeformAttn, _sample_with_grid, ms_deform_attn_pytorch

SHAPES = [(3, 4), (2, 5), (1, 1)]


def bilinear_zero_padded(image, x, y):
    """Sample image (D, H, W) at normalised (x, y) in [0, 1] coordinates; outside pixels are 0.

    Pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H).
    """
    _, height, width = image.shape
    px = x * width - 0.5
    py = y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = torch.zeros(image.shape[0], dtype=image.dtype)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            i, j = y0 + dy, x0 + dx
            if 0 <= i < height and 0 <= j < width:
                total += wy * wx * image[:, i, j]
    return total


def reference_attention(value, shapes, locations, weights):
    """value (B, S, M, D), locations (B, Q, M, L, P, 2), weights (B, Q, M, L, P) -> (B, Q, M·D)."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for m in range(heads):
            for lvl, (h, w) in enumerate(shapes):
                # (h·w, D) row-major tokens -> (D, h, w)
                image = value[b, starts[lvl] : starts[lvl + 1], m].t().reshape(dim, h, w)
                for q in range(queries):
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        sample = bilinear_zero_padded(image, x, y)
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.reshape(batch, queries, heads * dim)


def random_inputs(batch=2, heads=2, dim=3, queries=5, points=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, dim, generator=gen, dtype=torch.float64)
    # Many points fall outside [0, 1] to exercise the zero padding.
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=gen)
    locations = (locations.double() * 1.6 - 0.3).requires_grad_()
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=gen).double()
    return value.requires_grad_(), locations, weights.requires_grad_()


@pytest.mark.parametrize("grad", [True, False], ids=["grid_sample", "embedding_bag"])
def test_matches_loop_reference_including_points_outside(grad):
    # With autograd the levels are read by grid_sample; without, by one embedding_bag.
    value, locations, weights = random_inputs(queries=40)
    locations = locations.detach() * 2 - 0.5  # some far outside, in every direction
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.any() and (~outside).any()
    with torch.set_grad_enabled(grad):
        got = ms_deform_attn_pytorch(value, SHAPES, locations, weights)
    assert got.requires_grad == grad
    expected = reference_attention(value.detach(), SHAPES, locations, weights.detach())
    assert got.shape == (2, 40, 2 * 3)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-10)


def test_bag_path_under_bf16_autocast_samples_in_float32():
    value, locations, weights = (t.detach().float() for t in random_inputs(dim=8, seed=2))
    with torch.no_grad():
        exact = ms_deform_attn_pytorch(value, SHAPES, locations, weights)
        # as in the model under autocast: bf16 value projection, float32 locations and weights
        got = ms_deform_attn_pytorch(value.bfloat16(), SHAPES, locations, weights)
        rounded = ms_deform_attn_pytorch(value.bfloat16().float(), SHAPES, locations, weights)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rounded, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, exact)  # the bf16 rounding of the values is all that differs


def test_pixel_centre_reads_that_pixel_and_far_points_read_zero():
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)  # one 3×4 level, v = 4i + j
    shapes = [(3, 4)]
    # (x, y) of pixel centre (i=2, j=1); a point far outside; the midpoint of pixels (0,0),(0,1).
    locs = torch.tensor(
        [[(1.5 / 4, 2.5 / 3)], [(5.0, 5.0)], [(1.0 / 4, 0.5 / 3)]], dtype=torch.float64
    )
    locations = locs.view(1, 3, 1, 1, 1, 2)
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    got = ms_deform_attn_pytorch(value, shapes, locations, weights).flatten()
    torch.testing.assert_close(got, torch.tensor([9.0, 0.0, 0.5], dtype=torch.float64))


def test_half_outside_the_border_is_zero_padded():
    value = torch.full((1, 4, 1, 1), 2.0, dtype=torch.float64)  # 2×2 map of 2s
    # x = 0 is the left edge: halfway between the (zero) padding column and column 0.
    locations = torch.tensor([0.0, 0.25], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    got = ms_deform_attn_pytorch(value, [(2, 2)], locations, weights)
    torch.testing.assert_close(got.flatten(), torch.tensor([1.0], dtype=torch.float64))


def test_gradients_match_finite_differences():
    value, locations, weights = random_inputs(batch=1, heads=2, dim=2, queries=3, points=2, seed=1)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_pytorch(v, SHAPES, loc, w),
        (value, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


def test_rejects_inconsistent_shapes():
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn_pytorch(value, [(3, 4), (2, 5), (2, 1)], locations, weights)
    with pytest.raises(ValueError, match="spatial shapes"):
        ms_deform_attn_pytorch(value, SHAPES[:2], locations, weights)


def test_initial_offsets_form_directional_grid_and_attention_is_uniform():
    heads, levels, points = 8, 3, 4
    attn = MSDeformAttn(dim=32, num_heads=heads, num_levels=levels, num_points=points)
    query = torch.randn(2, 7, 32)
    offsets = attn.sampling_offsets(query).view(2, 7, heads, levels, points, 2)
    for m in range(heads):
        angle = 2 * math.pi * m / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(points):
            expected = (p + 1) * direction
            torch.testing.assert_close(offsets[:, :, m, :, p], expected.expand(2, 7, levels, 2))
    logits = attn.attention_weights(query)
    assert torch.count_nonzero(logits) == 0  # softmax of zeros: uniform 1 / (L·P)


def test_module_wiring_matches_reference():
    """Offsets are in pixels of each level, weights are a softmax over L·P, value has no pos."""
    torch.manual_seed(0)
    dim, heads, levels, points = 8, 2, len(SHAPES), 2
    attn = MSDeformAttn(dim=dim, num_heads=heads, num_levels=levels, num_points=points).double()
    for p in attn.parameters():  # move away from the special initialisation
        torch.nn.init.normal_(p, std=0.5)
    tokens = sum(h * w for h, w in SHAPES)
    batch, queries = 2, 4
    query = torch.randn(batch, queries, dim, dtype=torch.float64)
    value_in = torch.randn(batch, tokens, dim, dtype=torch.float64)
    ref = torch.rand(batch, queries, 2, dtype=torch.float64)
    got = attn(query, ref, value_in, SHAPES)

    lin = torch.nn.functional.linear
    value = lin(value_in, attn.value_proj.weight, attn.value_proj.bias)
    value = value.view(batch, tokens, heads, dim // heads)
    offsets = lin(query, attn.sampling_offsets.weight, attn.sampling_offsets.bias)
    offsets = offsets.view(batch, queries, heads, levels, points, 2)
    logits = lin(query, attn.attention_weights.weight, attn.attention_weights.bias)
    logits = logits.view(batch, queries, heads, levels * points)
    weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    weights = weights.view(batch, queries, heads, levels, points)
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(SHAPES):
        locations[:, :, :, lvl, :, 0] = ref[:, :, None, None, 0] + offsets[:, :, :, lvl, :, 0] / w
        locations[:, :, :, lvl, :, 1] = ref[:, :, None, None, 1] + offsets[:, :, :, lvl, :, 1] / h
    sampled = reference_attention(value, SHAPES, locations, weights)
    expected = lin(sampled, attn.output_proj.weight, attn.output_proj.bias)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # the training read's gradients, off the pixel grid, against autograd through grid_sample
    by_grid = _sample_with_grid(value, SHAPES, locations, weights)
    by_grid = lin(by_grid, attn.output_proj.weight, attn.output_proj.bias)
    params = list(attn.parameters())
    for got_grad, expected_grad in zip(
        torch.autograd.grad(got.pow(2).sum(), params),
        torch.autograd.grad(by_grid.pow(2).sum(), params),
    ):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-9)


def test_module_gradients_reach_every_parameter():
    attn = MSDeformAttn(dim=8, num_heads=2, num_levels=len(SHAPES), num_points=2)
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(1, tokens, 8, requires_grad=True)
    out = attn(torch.randn(1, tokens, 8), torch.rand(1, tokens, 2), value, SHAPES)
    (out**2).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert value.grad.abs().sum() > 0


def test_reference_points_shared_by_the_batch_broadcast():
    attn = MSDeformAttn(dim=8, num_heads=2, num_levels=len(SHAPES), num_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
    tokens = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(3, tokens, 8), torch.randn(3, tokens, 8)
    ref = torch.rand(1, tokens, 2)
    shared = attn(query, ref, value, SHAPES)
    torch.testing.assert_close(shared, attn(query, ref.expand(3, -1, -1), value, SHAPES))
    for b in range(3):  # and each clip only sees its own values
        torch.testing.assert_close(
            shared[b : b + 1], attn(query[b : b + 1], ref, value[b : b + 1], SHAPES)
        )


def test_training_read_keeps_only_its_inputs_for_backward():
    # A deformable layer keeps only value, positions and weights (and the L map sizes that
    # scale locations to positions); its own backward (per-corner dot products, the value
    # gradient as a sorted transposed read) gives grid_sample's gradients, also for points far
    # outside in every direction (no gradient there).
    value, locations, weights = random_inputs(queries=20, points=4, seed=5)
    locations = (locations.detach() * 2 - 0.5).requires_grad_()
    saved = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        output = ms_deform_attn_pytorch(value, SHAPES, locations, weights)
    sizes = 2 * len(SHAPES)
    assert sum(saved) == value.numel() + locations.numel() + weights.numel() + sizes
    output.pow(2).sum().backward()
    grads = [t.grad.clone() for t in (value, locations, weights)]
    for t in (value, locations, weights):
        t.grad = None
    _sample_with_grid(value, SHAPES, locations, weights).pow(2).sum().backward()
    for got, expected in zip(grads, (value.grad, locations.grad, weights.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    far = ((locations < -0.6) | (locations > 1.6)).any(-1)  # outside every level's border
    assert far.any() and grads[1][far].eq(0).all() and grads[2][far].eq(0).all()
    assert grads[1][~far].ne(0).any()
