"""THEMask: shapes, padding, batching, semantic inference and gradients on tiny presets."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from themask.modeling.build import build_model
from themask.modeling.outputs import Predictions, PredictionSet
from themask.modeling.themask import FrameFeatures, semantic_map

CLASSES = 4
SIZE = (97, 131)  # odd, not a multiple of 32 (padded to 128 × 160)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        name: build_model(name, num_classes=CLASSES, drop_path_rate=0.0)
        for name in ("themask_tiny_t1", "themask_tiny_t2")
    }


def clip_batch(batch, frames, size=SIZE, seed=0):
    return torch.randn(batch, frames, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["themask_tiny_t1", "themask_tiny_t2"])
@pytest.mark.parametrize("frames", [1, 2])
def test_output_shapes_train_and_eval(models, name, frames):
    model = models[name]
    x = clip_batch(2, frames)
    model.train()
    predictions = model(x)
    assert isinstance(predictions, Predictions)
    assert len(predictions.clip) == model.config.decoder_layers + 1
    low = (128 // 4, 160 // 4)
    n = model.config.num_queries
    if model.is_temporal:
        assert predictions.clip[0].class_logits.shape == (2, n, CLASSES + 1)
        assert predictions.clip[0].mask_logits.shape == (2, n, frames, *low)
        assert len(predictions.frame) == len(predictions.clip)
        assert predictions.frame[0].class_logits.shape == (2, frames, n, CLASSES + 1)
        assert predictions.frame[0].mask_logits.shape == (2, n, frames, *low)
    else:
        assert predictions.clip[0].class_logits.shape == (2 * frames, n, CLASSES + 1)
        assert predictions.clip[0].mask_logits.shape == (2 * frames, n, 1, *low)
        assert predictions.frame is None
    model.eval()
    with torch.no_grad():
        scores = model(x)
    assert scores.shape == (2, frames, CLASSES, *SIZE)
    assert torch.isfinite(scores).all()


def test_semantic_inference_by_hand():
    # 2 queries, 2 classes (+ no-object), one frame of 1 × 2 pixels
    class_logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])  # (B=1, N=2, K+1=3)
    mask_logits = torch.tensor([[[[[0.0, 1.0]]], [[[-1.0, 3.0]]]]])  # (1, 2, T=1, 1, 2)
    p0 = [1 / 3, 1 / 3]
    e2 = torch.exp(torch.tensor(2.0)).item()
    p1 = [e2 / (e2 + 2), 1 / (e2 + 2)]
    s = torch.sigmoid
    m0 = [s(torch.tensor(0.0)).item(), s(torch.tensor(1.0)).item()]
    m1 = [s(torch.tensor(-1.0)).item(), s(torch.tensor(3.0)).item()]
    expected = torch.tensor(
        [[p0[k] * m0[x] + p1[k] * m1[x] for x in range(2)] for k in range(2)]
    ).view(1, 1, 2, 1, 2)
    assert torch.allclose(semantic_map(class_logits, mask_logits), expected, atol=1e-6)
    # a frame head has one class distribution per frame: same formula with (B, T, N, K+1)
    assert torch.allclose(semantic_map(class_logits[:, None], mask_logits), expected, atol=1e-6)


@pytest.mark.parametrize("per_frame", [False, True])
def test_semantic_map_equals_a_sum_over_queries_with_classes_innermost(per_frame):
    g = torch.Generator().manual_seed(4)
    batch, queries, frames, classes = 2, 5, 3, 6
    class_shape = (batch, frames, queries, classes + 1) if per_frame else (batch, queries, 7)
    class_logits = torch.randn(*class_shape, generator=g, dtype=torch.float64)
    mask_logits = torch.randn(batch, queries, frames, 4, 5, generator=g, dtype=torch.float64)
    scores = semantic_map(class_logits, mask_logits)
    probs = class_logits.softmax(-1)[..., :-1]
    probs = probs if per_frame else probs[:, None].expand(batch, frames, queries, classes)
    expected = sum(
        probs[:, :, q, :, None, None] * mask_logits[:, q, :, None].sigmoid() for q in range(queries)
    )
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    assert scores.permute(0, 1, 3, 4, 2).is_contiguous()  # each pixel's K scores together


def storage_ref(tensor: torch.Tensor) -> StorageWeakRef:
    """A weak reference to the memory under ``tensor`` (expired once no view holds it)."""
    return StorageWeakRef(tensor.untyped_storage())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 keeps a call's arguments alive")
def test_eval_frees_the_predictions_before_the_full_size_scores(models, monkeypatch):
    """At the final upsampling only its input is left: the mask logits and the stride-4 scores
    it was copied from are freed, views included (else they sit under the output in the heap)."""
    model = models["themask_tiny_t2"].eval()
    predicted, alive = [], []  # weak references to the storages
    hook = model.decoder.register_forward_hook(
        lambda module, args, out: predicted.append(storage_ref(out.final.mask_logits))
    )

    def stride4_scores(predictions):
        scores = type(model).stride4_scores(predictions)
        predicted.append(storage_ref(scores))
        return scores

    monkeypatch.setattr(model, "stride4_scores", stride4_scores)
    interpolate = F.interpolate

    def spy(x, *args, **kwargs):
        alive.append([not ref.expired() for ref in predicted])
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    try:
        with torch.no_grad():
            scores = model(clip_batch(1, 2))
    finally:
        hook.remove()
    assert alive[-1] == [False, False]  # the final upsampling: logits and stride-4 scores gone
    assert scores.stride(2) == 1  # a crop of channels-last scores: classes innermost


def test_semantic_scores_fuse_heads_upsample_and_crop(models):
    model = models["themask_tiny_t2"]
    generator = torch.Generator().manual_seed(1)
    sets = [
        PredictionSet(
            torch.randn(1, 3, CLASSES + 1, generator=generator),
            torch.randn(1, 3, 2, 8, 16, generator=generator),
        )
        for _ in range(2)
    ]
    frame = PredictionSet(
        torch.randn(1, 2, 3, CLASSES + 1, generator=generator),
        torch.randn(1, 3, 2, 8, 16, generator=generator),
    )
    predictions = Predictions(clip=sets, frame=[sets[0], frame], frames_per_clip=2)
    scores = model.semantic_scores(predictions, (30, 45))  # padded to 32 × 64 = 4 · (8, 16)
    low = 0.5 * semantic_map(sets[1].class_logits, sets[1].mask_logits) + 0.5 * semantic_map(
        frame.class_logits, frame.mask_logits
    )
    padded = F.interpolate(low[0], size=(32, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(scores[0], padded[..., :30, :45], atol=1e-6)
    with pytest.raises(ValueError, match="do not come from"):
        model.semantic_scores(predictions, (30, 70))  # would pad to 32 × 96


def test_eval_forward_equals_encode_decode_scores(models):
    for model in models.values():
        model.eval()
        x = clip_batch(1, 2, seed=3)
        with torch.no_grad():
            direct = model(x)
            staged = model.semantic_scores(model.decode(model.encode(x), 1, 2), SIZE)
        assert torch.equal(direct, staged)


def test_cpu_inference_encodes_frame_by_frame_with_the_same_features(models):
    # Without autograd on CPU, encode runs one frame per pass; with autograd, one batched pass.
    model = models["themask_tiny_t2"].eval()
    x = clip_batch(2, 2, seed=5)
    batched = model.encode(x)
    calls = []
    hook = model.pixel_decoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0][0])))
    try:
        with torch.no_grad():
            per_frame = model.encode(x)
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 1]
    torch.testing.assert_close(per_frame.mask_features, batched.mask_features.detach())
    for got, expected in zip(per_frame.multi_scale, batched.multi_scale):
        torch.testing.assert_close(got, expected.detach())


def test_encode_pads_with_zeros_and_scores_are_cropped(models):
    for model in models.values():
        model.eval()
        x = clip_batch(1, 2, seed=4)
        padded = F.pad(x, (0, 160 - SIZE[1], 0, 128 - SIZE[0]))
        with torch.no_grad():
            features = model.encode(x)
            features_padded = model.encode(padded)
            assert torch.allclose(features.mask_features, features_padded.mask_features, atol=1e-5)
            scores = model(x)
            scores_padded = model(padded)
        assert torch.allclose(scores, scores_padded[..., : SIZE[0], : SIZE[1]], atol=1e-5)


@pytest.mark.parametrize("name", ["themask_tiny_t1", "themask_tiny_t2"])
def test_batch_of_two_equals_two_single_runs(models, name):
    model = models[name].eval()
    x = torch.cat([clip_batch(1, 2, seed=5), clip_batch(1, 2, seed=6)])
    with torch.no_grad():
        together = model(x)
        apart = torch.cat([model(x[:1]), model(x[1:])])
    assert torch.allclose(together, apart, atol=1e-5)


def test_frame_features_select_and_cat(models):
    model = models["themask_tiny_t2"].eval()
    with torch.no_grad():
        features = model.encode(clip_batch(1, 3, seed=7))
        picked = features.select([2, 0])
        assert torch.equal(picked.mask_features, features.mask_features[[2, 0]])
        joined = FrameFeatures.cat([features.select([0]), features.select([1, 2])])
        for a, b in zip(
            joined.multi_scale + [joined.mask_features],
            features.multi_scale + [features.mask_features],
        ):
            assert torch.equal(a, b)
        # decoding reused features equals decoding a fresh encode of the same window
        window = model.semantic_scores(model.decode(features.select([1, 2]), 1, 2), SIZE)
        fresh = model(clip_batch(1, 3, seed=7)[:, 1:])
        assert torch.allclose(window, fresh, atol=1e-5)


def test_single_frame_scores_regroup_into_clips(models):
    model = models["themask_tiny_t1"].eval()
    x = clip_batch(2, 2, seed=8)
    with torch.no_grad():
        scores = model(x)
        per_frame = model(x.flatten(0, 1)[:, None])  # (B·T, 1, ...): each frame alone
    assert torch.allclose(scores.flatten(0, 1), per_frame[:, 0], atol=1e-5)


@pytest.mark.parametrize("name", ["themask_tiny_t1", "themask_tiny_t2"])
def test_gradients_reach_every_parameter(models, name):
    model = models[name].train()
    model.zero_grad(set_to_none=True)
    predictions = model(clip_batch(1, 2, size=(64, 64), seed=9))
    heads = [predictions.clip] + ([predictions.frame] if predictions.frame else [])
    loss = sum(
        s.class_logits.square().mean() + s.mask_logits.square().mean()
        for sets in heads
        for s in sets
    )
    loss.backward()
    # DDP without find_unused_parameters: every parameter takes part in the graph
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # and every decoder parameter really gets a signal (the pixel decoder's deformable
    # attention starts from zero-initialised offset/weight projections, so some of its
    # inputs get exactly zero gradient at initialisation)
    silent = {n for n, p in model.decoder.named_parameters() if not p.grad.abs().sum()}
    # but time_score.bias shifts every frame's score alike and the softmax over frames cancels
    # it: its gradient is zero up to round-off (exactly zero in some runs)
    assert silent <= {"temporal.time_score.bias"}
    if name.endswith("t2"):
        bias_grad = model.decoder.temporal.time_score.bias.grad.abs().max()
        assert bias_grad <= 1e-5 * model.decoder.temporal.time_score.weight.grad.abs().max()
