from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from naive import match_one_set, naive_bilinear
from transfers import TransferCounter

import themask.loss.criterion as criterion_module
from themask.distributed import all_reduce
from themask.loss.config import LossConfig
from themask.loss.criterion import (
    SetCriterion,
    assign,
    class_loss,
    gather,
    hard_mask_loss,
    mask_reader,
    soft_mask_loss,
)
from themask.loss.matcher import BatchMatch, MatchIndices
from themask.loss.point_sample import (
    most_uncertain,
    point_sample,
    sample_queries,
    uncertain_point_coords,
)
from themask.loss.targets import build_targets
from themask.modeling.outputs import MaskSource, Predictions, PredictionSet
from themask.rng import uniform

# ---------------------------------------------------------------- naive references


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def naive_bce_dice(logits, targets):
    probs = [sigmoid(v) for v in logits]
    bce = sum(-(y * math.log(p) + (1 - y) * math.log(1 - p)) for p, y in zip(probs, targets))
    dice = 1 - (2 * sum(p * y for p, y in zip(probs, targets)) + 1) / (
        sum(probs) + sum(targets) + 1
    )
    return bce / len(targets), dice


def naive_hard(pred, gt, coords):
    """pred (h, w), gt (H, W), coords list of (x, y): point-sampled (bce, dice)."""
    logits = [naive_bilinear(pred, x, y) for x, y in coords]
    labels = [naive_bilinear(gt, x, y) for x, y in coords]
    return naive_bce_dice(logits, labels)


def naive_soft(pred, gt, full_target=False):
    """pred (h, w) upsampled by nearest to gt (H, W); target gt ∧ σ(pred) > 0.5: (bce, dice)."""
    (h, w), (big_h, big_w) = pred.shape, gt.shape
    logits, labels = [], []
    for y in range(big_h):
        for x in range(big_w):
            value = float(pred[y * h // big_h, x * w // big_w])
            logits.append(value)
            fires = full_target or sigmoid(value) > 0.5
            labels.append(float(gt[y, x]) * float(fires))
    return naive_bce_dice(logits, labels)


def naive_class_loss(class_logits, classes, matches, num_classes, no_object_weight, kept=None):
    """class_logits (B, N, K+1) or (B, T, N, K+1); weighted-mean cross-entropy by loops.

    kept: labelled frames per clip (default all); the clip head keeps clips with any.
    """
    if class_logits.dim() == 3:
        class_logits = class_logits[:, None]
        kept = None if kept is None else [[0] if frames else [] for frames in kept]
    numerator = denominator = 0.0
    batch, frames, queries, _ = class_logits.shape
    for b in range(batch):
        assigned = {}
        for query, target in (matches[b].primary, matches[b].secondary):
            for q, t in zip(query.tolist(), target.tolist()):
                assigned[q] = int(classes[b][t])
        for t in range(frames) if kept is None else kept[b]:
            for q in range(queries):
                target = assigned.get(q, num_classes)
                weight = no_object_weight if target == num_classes else 1.0
                log_probs = class_logits[b, t, q].log_softmax(-1)
                numerator += -weight * float(log_probs[target])
                denominator += weight
    return numerator / denominator


def pair(queries, targets):
    return torch.tensor(queries, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


FIXED_COORDS = torch.tensor(
    [[0.1, 0.2], [0.5, 0.5], [0.93, 0.07], [0.3, 0.81], [0.66, 0.4], [0.02, 0.99]]
)


@pytest.fixture
def fixed_points(monkeypatch):
    def fake(logits, **_):
        return FIXED_COORDS.expand(logits.shape[0], -1, -1).clone()

    monkeypatch.setattr(criterion_module, "uncertain_point_coords", fake)
    return [tuple(c) for c in FIXED_COORDS.tolist()]


# ---------------------------------------------------------------- point sampling


def test_point_sample_equals_naive_bilinear():
    torch.manual_seed(0)
    maps = torch.randn(3, 2, 5, 7)
    coords = torch.rand(3, 9, 2)
    coords[0, 0] = torch.tensor([0.0, 0.0])
    coords[0, 1] = torch.tensor([1.0, 0.999])
    sampled = point_sample(maps, coords)
    assert sampled.shape == (3, 2, 9)
    for r in range(3):
        for c in range(2):
            for p in range(9):
                expected = naive_bilinear(maps[r, c], *coords[r, p].tolist())
                assert sampled[r, c, p].item() == pytest.approx(expected, abs=1e-5)


def test_sample_queries_reads_every_frame_like_point_sample():
    # the matcher's reader (one embedding_bag over pixel rows) against grid_sample per frame,
    # points inside and outside the map
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 5, 3, 7, 9, generator=gen, dtype=torch.float64).float()
    coords = torch.rand(2, 11, 2, generator=gen) * 1.4 - 0.2
    assert ((coords < 0) | (coords > 1)).any()
    expected = point_sample(maps.flatten(1, 2), coords).reshape(2, 5, 3 * 11).transpose(1, 2)
    torch.testing.assert_close(sample_queries(maps, coords), expected, rtol=1e-6, atol=1e-6)


def test_most_uncertain_equals_naive_sort():
    torch.manual_seed(1)
    candidates = torch.rand(2, 20, 2)
    logits = torch.randn(2, 20)
    chosen = most_uncertain(candidates, logits, 6)
    for r in range(2):
        order = sorted(range(20), key=lambda i: abs(float(logits[r, i])))[:6]
        expected = {tuple(candidates[r, i].tolist()) for i in order}
        assert {tuple(p) for p in chosen[r].tolist()} == expected


def test_uncertain_point_coords_keeps_most_uncertain_candidates_then_fills():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 6)
    generator = torch.Generator().manual_seed(11)
    coords = uncertain_point_coords(
        logits,
        num_points=8,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        generator=generator,
    )
    assert coords.shape == (2, 8, 2)
    replay = torch.Generator().manual_seed(11)
    candidates = uniform(2, 24, 2, generator=replay)
    fill = uniform(2, 2, 2, generator=replay)
    for r in range(2):
        values = [naive_bilinear(logits[r], *candidates[r, i].tolist()) for i in range(24)]
        order = sorted(range(24), key=lambda i: abs(values[i]))[:6]
        expected = {tuple(candidates[r, i].tolist()) for i in order}
        assert {tuple(p) for p in coords[r, :6].tolist()} == expected
        assert torch.equal(coords[r, 6:], fill[r])


# ---------------------------------------------------------------- single terms


class ClipTargets:
    """Naive per-clip targets: present classes (ascending), masks (M, T, H, W), labelled frames."""

    def __init__(self, clip_labels):
        self.classes = sorted({int(v) for v in clip_labels.flatten()} - {255})
        self.masks = torch.stack([(clip_labels == c).float() for c in self.classes])
        self.frames = [t for t in range(clip_labels.shape[0]) if (clip_labels[t] != 255).any()]


def make_clip_example(frames=1, unlabelled_frame=None):
    """Two clips, K = 3, N = 5, masks 4×4 → labels 8×8; explicit matches; naive targets.

    unlabelled_frame: a frame of clip 0 whose labels are all ignore.
    """
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (2, frames, 8, 8))
    labels[1] = torch.randint(1, 3, (frames, 8, 8))
    labels[1, :, :2] = 255
    if unlabelled_frame is not None:
        labels[0, unlabelled_frame] = 255
    targets = [ClipTargets(clip) for clip in labels]
    assert targets[0].classes == [0, 1, 2] and targets[1].classes == [1, 2]
    matches = [
        MatchIndices(primary=pair([1, 3, 4], [2, 0, 1]), secondary=pair([0, 2], [0, 1])),
        MatchIndices(primary=pair([0, 2], [1, 0]), secondary=pair([3, 4], [0, 1])),
    ]
    return labels, targets, matches


def batch_match(matches_per_set, labels):
    """What the matcher returns for fixed ``matches_per_set[set][clip]``."""
    return BatchMatch(
        matches=matches_per_set,
        classes=[np.array(ClipTargets(clip).classes, dtype=np.int64) for clip in labels],
        labelled=(labels != 255).flatten(2).any(-1).numpy(),
    )


def assigned(matches, labels, queries=5, num_classes=3):
    result = batch_match([matches], labels)
    return assign(result, queries=queries, num_classes=num_classes, device=torch.device("cpu"))


def gt_reader(labels, rows):
    return mask_reader(build_targets(labels, 3), rows)


def gt_cells(labels, rows, size):
    counts, cell_sizes = build_targets(labels, 3).cell_counts(*size)
    return counts[rows.clip, rows.frame, rows.cls], cell_sizes


HARD_ARGS = dict(num_points=6, oversample_ratio=3.0, importance_sample_ratio=0.75)


def test_class_loss_equals_naive_weighted_cross_entropy_summed_over_sets():
    labels, targets, matches = make_clip_example()
    other = [MatchIndices(primary=m.secondary, secondary=m.primary) for m in matches]
    result = batch_match([matches, other], labels)
    assignment = assign(result, queries=5, num_classes=3, device=torch.device("cpu"))
    classes = [t.classes for t in targets]
    for shape in [(2, 5, 4), (2, 3, 5, 4)]:  # clip head, frame head (T = 3)
        logits = [torch.randn(*shape), torch.randn(*shape)]
        got = class_loss(logits, assignment.class_target, no_object_weight=0.1)
        expected = sum(
            naive_class_loss(set_logits, classes, set_matches, 3, 0.1)
            for set_logits, set_matches in zip(logits, [matches, other])
        )
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hard_mask_loss_equals_naive_point_loss(fixed_points):
    labels, targets, matches = make_clip_example(frames=2)
    mask_logits = torch.randn(2, 5, 2, 4, 4) * 2
    rows = assigned(matches, labels).primary
    bce, dice = hard_mask_loss(
        gather([PredictionSet(torch.empty(0), mask_logits)], rows),
        gt_reader(labels, rows),
        **HARD_ARGS,
    )
    expected_bce = expected_dice = 0.0
    for b, match in enumerate(matches):
        for q, m in zip(*[x.tolist() for x in match.primary]):
            for t in range(2):
                pb, pd = naive_hard(mask_logits[b, q, t], targets[b].masks[m, t], fixed_points)
                expected_bce, expected_dice = expected_bce + pb, expected_dice + pd
    assert bce.item() == pytest.approx(expected_bce, rel=1e-5)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-5)


def test_soft_mask_loss_equals_naive_dense_loss_with_soft_target():
    labels, targets, matches = make_clip_example(frames=2)
    mask_logits = torch.randn(2, 5, 2, 4, 4) * 2
    rows = assigned(matches, labels).secondary
    bce, dice = soft_mask_loss(
        gather([PredictionSet(torch.empty(0), mask_logits)], rows), *gt_cells(labels, rows, (4, 4))
    )
    expected_bce = expected_dice = 0.0
    for b, match in enumerate(matches):
        for q, m in zip(*[x.tolist() for x in match.secondary]):
            for t in range(2):
                pb, pd = naive_soft(mask_logits[b, q, t], targets[b].masks[m, t])
                expected_bce, expected_dice = expected_bce + pb, expected_dice + pd
    assert bce.item() == pytest.approx(expected_bce, rel=1e-5)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-5)
    # the soft target differs from the GT here, so the full-GT loss would not match
    full = sum(
        naive_soft(mask_logits[b, q, t], targets[b].masks[m, t], full_target=True)[0]
        for b, match in enumerate(matches)
        for q, m in zip(*[x.tolist() for x in match.secondary])
        for t in range(2)
    )
    assert abs(full - expected_bce) > 1e-3


def test_soft_mask_loss_per_cell_equals_naive_dense_loss_for_uneven_cells():
    torch.manual_seed(6)
    labels = torch.randint(0, 3, (1, 2, 11, 7))  # 11×7 labels from 3×5 masks: uneven cells
    labels[0, 1, :4] = 255
    mask_logits = torch.randn(1, 5, 2, 3, 5) * 2
    match = MatchIndices(primary=pair([0], [0]), secondary=pair([1, 2, 4], [0, 1, 2]))
    rows = assigned([match], labels).secondary
    bce, dice = soft_mask_loss(
        gather([PredictionSet(torch.empty(0), mask_logits)], rows), *gt_cells(labels, rows, (3, 5))
    )
    expected = [0.0, 0.0]
    for q, m in zip(*[x.tolist() for x in match.secondary]):
        for t in range(2):
            pb, pd = naive_soft(mask_logits[0, q, t], (labels[0, t] == m).float())
            expected[0], expected[1] = expected[0] + pb, expected[1] + pd
    assert bce.item() == pytest.approx(expected[0], rel=1e-5)
    assert dice.item() == pytest.approx(expected[1], rel=1e-5)


# ---------------------------------------------------------------- whole criterion


class StubMatcher:
    """Returns fixed matches for every set and records what it was given."""

    def __init__(self, matches):
        self.matches = matches
        self.calls = []

    def match_sets(self, sets, targets, *, num_rounds):
        self.calls.append((sets, num_rounds))
        matches = self.matches
        if num_rounds == 1:
            matches = [MatchIndices(primary=m.primary) for m in self.matches]
        return batch_match([matches for _ in sets], targets.labels)


def expected_head_loss(class_logits, mask_logits, targets, matches, points, config, hard_second):
    """Naive loss of one set of one head; unlabelled frames are skipped."""
    classes = [t.classes for t in targets]
    frames = mask_logits.shape[2]
    pairs = sum(len(t.classes) * len(t.frames) for t in targets)
    kept = [t.frames for t in targets]
    ce = naive_class_loss(class_logits, classes, matches, 3, config.no_object_weight, kept)
    sums = {"hard": [0.0, 0.0], "second": [0.0, 0.0]}
    for b, match in enumerate(matches):
        for key, (query, target) in (("hard", match.primary), ("second", match.secondary)):
            for q, m in zip(query.tolist(), target.tolist()):
                for t in targets[b].frames:
                    pred, gt = mask_logits[b, q, t], targets[b].masks[m, t]
                    if key == "hard" or hard_second:
                        pb, pd = naive_hard(pred, gt, points)
                    else:
                        pb, pd = naive_soft(pred, gt)
                    sums[key][0] += pb
                    sums[key][1] += pd
    norm = max(pairs, frames)
    w1, w2 = config.round_weights
    second_weights = (
        (config.mask_weight, config.dice_weight)
        if hard_second
        else (config.soft_mask_weight, config.soft_dice_weight)
    )
    return (
        config.class_weight * ce
        + w1 * (config.mask_weight * sums["hard"][0] + config.dice_weight * sums["hard"][1]) / norm
        + w2
        * (second_weights[0] * sums["second"][0] + second_weights[1] * sums["second"][1])
        / norm
    )


def random_sets(count, frames, temporal):
    torch.manual_seed(4)
    clip = [
        PredictionSet(torch.randn(2, 5, 4), torch.randn(2, 5, frames, 4, 4) * 2)
        for _ in range(count)
    ]
    if not temporal:
        return Predictions(clip=clip)
    frame = [
        PredictionSet(torch.randn(2, frames, 5, 4), torch.randn(2, 5, frames, 4, 4) * 2)
        for _ in range(count)
    ]
    return Predictions(clip=clip, frame=frame)


@pytest.mark.parametrize("second_round_loss", ["soft", "hard"])
def test_tad_criterion_total_equals_naive_sum(fixed_points, second_round_loss):
    labels, targets, matches = make_clip_example(frames=2)
    predictions = random_sets(2, frames=2, temporal=True)
    config = LossConfig(second_round_loss=second_round_loss)
    criterion = SetCriterion(config, num_classes=3)
    criterion.matcher = StubMatcher(matches)
    output = criterion(predictions, labels)
    hard_second = second_round_loss == "hard"
    expected = 0.0
    for clip_set, frame_set in zip(predictions.clip, predictions.frame):
        args = (targets, matches, fixed_points, config, hard_second)
        expected += expected_head_loss(clip_set.class_logits, clip_set.mask_logits, *args)
        expected += 0.25 * expected_head_loss(frame_set.class_logits, frame_set.mask_logits, *args)
    assert output.total.item() == pytest.approx(expected, rel=1e-5)
    # one matching per set, from clip-head classes and frame-head masks
    ((sets, rounds),) = criterion.matcher.calls
    assert rounds == 2 and len(sets) == 2
    for (class_logits, mask_logits), clip_set, frame_set in zip(
        sets, predictions.clip, predictions.frame
    ):
        assert class_logits is clip_set.class_logits and mask_logits is frame_set.mask_logits
    loss_terms = {k: v for k, v in output.terms.items() if k.startswith(("loss_", "frame_loss_"))}
    assert len(loss_terms) == 10
    assert all(v.dim() == 0 and not v.requires_grad for v in loss_terms.values())
    assert float(sum(loss_terms.values())) == pytest.approx(output.total.item(), rel=1e-5)
    assert output.terms["matched_fraction_round1"] == pytest.approx((3 + 2) / (2 * 5))
    assert output.terms["matched_fraction_round2"] == pytest.approx((2 + 2) / (2 * 5))
    assert output.terms["num_masks"] == 5


def test_unlabelled_frame_is_left_out_of_every_loss_equals_naive(fixed_points):
    # clip 0: frame 1 of 3 is all ignore; the naive sum runs over labelled frames only and
    # normalises by the (mask, labelled frame) pairs: 3 masks × 2 frames + 2 masks × 3 frames
    labels, targets, matches = make_clip_example(frames=3, unlabelled_frame=1)
    assert targets[0].frames == [0, 2] and targets[1].frames == [0, 1, 2]
    predictions = random_sets(2, frames=3, temporal=True)
    config = LossConfig()
    criterion = SetCriterion(config, num_classes=3)
    criterion.matcher = StubMatcher(matches)
    output = criterion(predictions, labels)
    expected = 0.0
    for clip_set, frame_set in zip(predictions.clip, predictions.frame):
        args = (targets, matches, fixed_points, config, False)
        expected += expected_head_loss(clip_set.class_logits, clip_set.mask_logits, *args)
        expected += 0.25 * expected_head_loss(frame_set.class_logits, frame_set.mask_logits, *args)
    assert output.total.item() == pytest.approx(expected, rel=1e-5)
    assert output.terms["num_masks"] == 5


def perturb_frame(predictions, clip, frame):
    """A copy of ``predictions`` with new values on one frame of one clip (both heads)."""
    torch.manual_seed(99)
    clip_sets = []
    for s in predictions.clip:
        masks = s.mask_logits.detach().clone()
        masks[clip, :, frame] = torch.randn_like(masks[clip, :, frame]) * 5
        clip_sets.append(PredictionSet(s.class_logits.detach().clone(), masks))
    frame_sets = []
    for s in predictions.frame:
        classes, masks = s.class_logits.detach().clone(), s.mask_logits.detach().clone()
        classes[clip, frame] = torch.randn_like(classes[clip, frame]) * 5
        masks[clip, :, frame] = torch.randn_like(masks[clip, :, frame]) * 5
        frame_sets.append(PredictionSet(classes, masks))
    return Predictions(clip=clip_sets, frame=frame_sets)


class RecordingMatcher:
    def __init__(self, matcher):
        self.matcher, self.results = matcher, []

    def match_sets(self, sets, targets, *, num_rounds):
        self.results.append(self.matcher.match_sets(sets, targets, num_rounds=num_rounds))
        return self.results[-1]


def test_predictions_on_an_unlabelled_frame_change_neither_matching_nor_losses():
    labels, _, _ = make_clip_example(frames=3, unlabelled_frame=1)
    predictions = random_sets(3, frames=3, temporal=True)
    for s in predictions.clip + predictions.frame:
        s.class_logits.requires_grad_(True)
        s.mask_logits.requires_grad_(True)
    criterion = SetCriterion(LossConfig(num_points=32), num_classes=3)
    criterion.matcher = RecordingMatcher(criterion.matcher)
    outputs = []
    for preds in (predictions, perturb_frame(predictions, clip=0, frame=1)):
        torch.manual_seed(5)  # same point draws
        outputs.append(criterion(preds, labels))
    first, second = criterion.matcher.results
    for set_a, set_b in zip(first.matches, second.matches):
        for a, b in zip(set_a, set_b):
            assert all(
                torch.equal(x, y) for x, y in zip(a.primary + a.secondary, b.primary + b.secondary)
            )
    assert torch.equal(outputs[0].total, outputs[1].total)
    for name, value in outputs[0].terms.items():
        assert float(value) == float(outputs[1].terms[name]), name
    # and no gradient reaches the unlabelled frame's predictions
    outputs[0].total.backward()
    for s in predictions.clip + predictions.frame:
        assert s.mask_logits.grad[0, :, 1].abs().sum() == 0
        assert s.mask_logits.grad[0, :, 0].abs().sum() > 0
    for s in predictions.frame:
        assert s.class_logits.grad[0, 1].abs().sum() == 0
        assert s.class_logits.grad[0, 0].abs().sum() > 0


def test_hard_second_round_uses_full_gt_masks(fixed_points):
    labels, targets, matches = make_clip_example()
    predictions = random_sets(1, frames=1, temporal=False)
    secondary_terms = {}
    for mode in ("soft", "hard"):
        criterion = SetCriterion(LossConfig(second_round_loss=mode), num_classes=3)
        criterion.matcher = StubMatcher(matches)
        secondary_terms[mode] = float(criterion(predictions, labels).terms["loss_mask_secondary"])
    mask_logits = predictions.clip[0].mask_logits
    full_gt = sum(
        naive_hard(mask_logits[b, q, 0], targets[b].masks[m, 0], fixed_points)[0]
        for b, match in enumerate(matches)
        for q, m in zip(*[x.tolist() for x in match.secondary])
    )
    assert secondary_terms["hard"] == pytest.approx(0.5 * 5.0 * full_gt / 5, rel=1e-5)
    assert abs(secondary_terms["hard"] - secondary_terms["soft"]) > 1e-3


def test_deep_supervision_sums_sets_and_switch_keeps_only_final(fixed_points):
    labels, _, matches = make_clip_example()
    predictions = random_sets(3, frames=1, temporal=False)
    criterion = SetCriterion(LossConfig(), num_classes=3)
    criterion.matcher = StubMatcher(matches)
    per_set = [criterion(Predictions(clip=[s]), labels).total.item() for s in predictions.clip]
    assert criterion(predictions, labels).total.item() == pytest.approx(sum(per_set), rel=1e-5)
    final_only = SetCriterion(LossConfig(deep_supervision=False), num_classes=3)
    final_only.matcher = StubMatcher(matches)
    assert final_only(predictions, labels).total.item() == pytest.approx(per_set[-1], rel=1e-5)


@pytest.mark.parametrize("second_round_loss", ["soft", "hard"])
def test_sets_together_equal_sets_one_by_one_in_values_and_gradients(
    fixed_points, second_round_loss
):
    labels, _, matches = make_clip_example(frames=3, unlabelled_frame=2)
    predictions = random_sets(3, frames=3, temporal=True)
    sets = predictions.clip + predictions.frame
    leaves = [t for s in sets for t in (s.class_logits, s.mask_logits)]
    for leaf in leaves:
        leaf.requires_grad_(True)
    criterion = SetCriterion(LossConfig(second_round_loss=second_round_loss), num_classes=3)
    criterion.matcher = StubMatcher(matches)
    together = criterion(predictions, labels)
    grads_together = torch.autograd.grad(together.total, leaves)
    one_by_one = [
        criterion(Predictions(clip=[c], frame=[f]), labels)
        for c, f in zip(predictions.clip, predictions.frame)
    ]
    total = sum(output.total for output in one_by_one)
    grads_one_by_one = torch.autograd.grad(total, leaves)
    assert together.total.item() == pytest.approx(total.item(), rel=1e-6)
    for name, value in together.terms.items():
        if name.startswith(("loss", "frame")):
            expected = sum(float(output.terms[name]) for output in one_by_one)
            assert float(value) == pytest.approx(expected, rel=1e-6, abs=1e-9), name
    for got, expected in zip(grads_together, grads_one_by_one):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads_together)


def obvious_example():
    """One clip, classes 0 (left) and 1 (right); strong primary candidates, weaker others."""
    labels = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    labels[..., 8:] = 1
    mask_logits = torch.randn(1, 6, 1, 4, 4)
    mask_logits[0, 3, 0, :, :2], mask_logits[0, 3, 0, :, 2:] = 6.0, -6.0
    mask_logits[0, 1, 0, :, :2], mask_logits[0, 1, 0, :, 2:] = -6.0, 6.0
    class_logits = torch.zeros(1, 6, 3)
    class_logits[0, 3, 0] = class_logits[0, 1, 1] = 6.0
    return labels, class_logits, mask_logits


@pytest.mark.parametrize(
    "config,step,two_rounds",
    [
        (LossConfig(num_rounds=1), 0, False),
        (LossConfig(num_rounds=2), 0, True),
        (LossConfig(num_rounds=2, warmup_steps=3), 2, False),
        (LossConfig(num_rounds=2, warmup_steps=3), 3, True),
    ],
)
def test_round_switches_and_warmup(config, step, two_rounds):
    labels, class_logits, mask_logits = obvious_example()
    config.num_points = 64
    criterion = SetCriterion(config, num_classes=2)
    torch.manual_seed(0)
    output = criterion(
        Predictions(clip=[PredictionSet(class_logits, mask_logits)]), labels, step=step
    )
    assert ("loss_mask_secondary" in output.terms) == two_rounds
    assert ("loss_dice_secondary" in output.terms) == two_rounds
    assert output.terms["matched_fraction_round1"] == pytest.approx(2 / 6)
    assert output.terms["matched_fraction_round2"] == pytest.approx(2 / 6 if two_rounds else 0.0)
    assert criterion.rounds_at(step) == (2 if two_rounds else 1)


def test_gradients_reach_secondary_queries_through_soft_and_class_loss():
    labels, class_logits, mask_logits = obvious_example()
    class_logits.requires_grad_(True)
    mask_logits.requires_grad_(True)
    criterion = SetCriterion(LossConfig(num_points=64), num_classes=2)
    torch.manual_seed(0)
    targets = build_targets(labels, 2)
    (match,) = match_one_set(criterion.matcher, class_logits, mask_logits, targets)
    secondary, secondary_targets = match.secondary
    unmatched = sorted(set(range(6)) - set(secondary.tolist()) - set(match.primary[0].tolist()))
    assignment = assigned([match], labels, queries=6, num_classes=2)
    rows = assignment.secondary
    bce, dice = soft_mask_loss(
        gather([PredictionSet(torch.empty(0), mask_logits)], rows), *gt_cells(labels, rows, (4, 4))
    )
    (bce + dice).backward()
    grad = mask_logits.grad[0]
    assert all(grad[q].abs().sum() > 0 for q in secondary.tolist())
    assert all(grad[q].abs().sum() == 0 for q in unmatched + match.primary[0].tolist())
    loss = class_loss([class_logits], assignment.class_target, no_object_weight=0.1)
    loss.backward()
    for q, m in zip(secondary.tolist(), secondary_targets.tolist()):
        assert class_logits.grad[0, q, m] < 0  # raises its GT class (classes 0, 1 = targets)


def test_unlabelled_clip_is_not_supervised_and_a_labelled_one_is():
    # clip 0 all ignore (unlabelled, not "no object everywhere"); clip 1 labelled by class 1
    labels = torch.full((2, 1, 8, 8), 255)
    labels[1, 0, 2:6] = 1
    predictions = random_sets(2, frames=1, temporal=False)
    for s in predictions.clip:
        s.class_logits.requires_grad_(True)
    criterion = SetCriterion(LossConfig(num_points=16), num_classes=3)
    output = criterion(predictions, labels)
    assert output.terms["num_masks"] == 1.0
    output.total.backward()
    for s in predictions.clip:
        assert s.class_logits.grad[0].abs().sum() == 0
        assert s.class_logits.grad[1].abs().sum() > 0
    all_ignore = SetCriterion(LossConfig(num_points=16), num_classes=3)(
        predictions, torch.full((2, 1, 8, 8), 255)
    )
    assert all_ignore.total.item() == 0.0 and all_ignore.terms["matched_fraction_round1"] == 0.0


def test_losses_finite_under_bfloat16_autocast():
    torch.manual_seed(5)
    labels = torch.randint(0, 3, (2, 2, 16, 16))
    weights = torch.randn(8, 5 * 2 * 4 * 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.randn(2, 8) @ weights  # bf16 under autocast
        mask_logits = features.reshape(2, 5, 2, 4, 4)
        class_logits = (torch.randn(2, 8) @ torch.randn(8, 5 * 4)).reshape(2, 5, 4)
        frame_logits = (torch.randn(2, 8) @ torch.randn(8, 2 * 5 * 4)).reshape(2, 2, 5, 4)
        assert mask_logits.dtype == torch.bfloat16
        predictions = Predictions(
            clip=[PredictionSet(class_logits, mask_logits)],
            frame=[PredictionSet(frame_logits, mask_logits * 0.5)],
        )
        output = SetCriterion(LossConfig(num_points=32), num_classes=3)(predictions, labels)
    assert output.total.dtype == torch.float32 and torch.isfinite(output.total)
    assert all(math.isfinite(v) for v in output.terms.values())
    output.total.backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().sum() > 0


def test_shape_errors_name_the_problem():
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    criterion = SetCriterion(LossConfig(), num_classes=3)
    wrong_classes = Predictions(
        clip=[PredictionSet(torch.randn(2, 5, 7), torch.randn(2, 5, 1, 4, 4))]
    )
    with pytest.raises(ValueError, match="num_classes"):
        criterion(wrong_classes, labels)
    wrong_frames = Predictions(
        clip=[PredictionSet(torch.randn(2, 5, 4), torch.randn(2, 5, 3, 4, 4))]
    )
    with pytest.raises(ValueError, match="B, N, T, h, w"):
        criterion(wrong_frames, labels)


def _num_masks_worker(rank, world_size, init_file, counts, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        values = all_reduce(torch.tensor(counts[rank]), mean=True)
        (out_dir / f"{rank}.txt").write_text(repr(values.tolist()))
        labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)  # rank 1: one GT mask
        if rank == 0:
            labels[..., 3:], labels[..., 6:] = 1, 2  # rank 0: three
        predictions = random_sets(1, frames=1, temporal=False)
        labels = labels.expand(2, -1, -1, -1)  # B = 2: 6 GT masks on rank 0, 2 on rank 1
        output = SetCriterion(LossConfig(num_points=16), num_classes=3)(predictions, labels)
        (out_dir / f"masks{rank}.txt").write_text(repr(float(output.terms["num_masks"])))
    finally:
        torch.distributed.destroy_process_group()


def test_counts_are_averaged_over_processes(tmp_path):
    counts = [[6.0, 3.0], [0.0, 0.0]]  # rank 0: 3 GT masks in 6 pairs, rank 1 none
    torch.multiprocessing.spawn(
        _num_masks_worker, args=(2, tmp_path / "init", counts, tmp_path), nprocs=2, join=True
    )
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == ["[3.0, 1.5]"] * 2
    assert [(tmp_path / f"masks{r}.txt").read_text() for r in range(2)] == ["4.0"] * 2
    single = all_reduce(torch.tensor([6.0, 3.0]), mean=True)
    assert single.tolist() == [6.0, 3.0]  # no DDP: unchanged


@pytest.mark.parametrize("all_class_columns,reads", [(True, {"d2h:cpu": 1}), (None, None)])
def test_criterion_reads_from_the_device_once_and_uploads_once(all_class_columns, reads):
    labels, _, _ = make_clip_example(frames=2, unlabelled_frame=1)
    predictions = random_sets(3, frames=2, temporal=True)
    criterion = SetCriterion(LossConfig(num_points=32), num_classes=3)
    criterion.matcher.all_class_columns = all_class_columns  # True: what runs on accelerators
    tensors = [labels] + [
        t for s in predictions.clip + predictions.frame for t in (s.class_logits, s.mask_logits)
    ]
    with TransferCounter(tensors) as counter:
        output = criterion(predictions, labels)
    counts = dict(counter.counts)
    assert counter.total("h2d") == 1 and counts["h2d:to"] == 1  # the assignments, once
    if reads is not None:
        assert {k: v for k, v in counts.items() if k.startswith("d2h")} == reads
    else:  # CPU columns: also reads the largest class count (free on CPU)
        assert counter.total("d2h") == 2 and counts["d2h:__int__"] == 1
    assert all(v.dim() == 0 for k, v in output.terms.items() if k.startswith(("loss", "frame")))


def test_transfer_counter_sees_reads_uploads_and_hidden_syncs():
    device_tensor = torch.arange(6.0)
    with TransferCounter([device_tensor]) as counter:
        derived = device_tensor * 2
        derived.sum().item()
        derived[derived > 3]  # boolean indexing: data-dependent shape
        torch.ones(2).to(torch.device("cpu"))  # an upload
        derived[:2] + torch.ones(2)  # a host tensor in an op on device tensors
        torch.zeros(3, device=device_tensor.device).tolist()
    assert counter.counts == {
        "d2h:item": 1,
        "d2h:__getitem__": 1,
        "h2d:to": 1,
        "h2d:mixed add": 1,
        "d2h:tolist": 1,
    }


@pytest.mark.parametrize("channels_last", [False, True])
def test_matched_rows_read_from_the_product_equal_indexing_with_its_gradients(channels_last):
    # _RowProduct: the rows' values are the product's, and its backward (row products grouped by
    # frame) gives autograd's gradients through the full product + indexing; the clip head's
    # embeddings are expanded over frames, sets 1-2 of 3 are read (offset), frame 1 unlabelled;
    # features (B·T, D, h·w) plain or pixel-major as the model's channels-last ones.
    gen = torch.Generator().manual_seed(0)
    batch, frames, sets, queries, dim, h, w = 2, 3, 3, 5, 4, 3, 4
    embeddings = torch.randn(batch, sets * queries, dim, generator=gen, dtype=torch.float64)
    embeddings.requires_grad_()
    shape = (batch * frames, h * w, dim) if channels_last else (batch * frames, dim, h * w)
    features = torch.randn(shape, generator=gen, dtype=torch.float64)
    features = (features.transpose(1, 2) if channels_last else features).detach().requires_grad_()
    expanded = embeddings.unsqueeze(1).expand(-1, frames, -1, -1).flatten(0, 1)
    flat = torch.bmm(expanded, features)  # (B·T, S·N, h·w)
    masks = flat.view(batch, frames, sets, queries, h, w).permute(2, 0, 3, 1, 4, 5)
    sources = [MaskSource(expanded, features, flat.detach(), s * queries) for s in (1, 2)]
    kept = [PredictionSet(torch.empty(0), masks[s], source) for s, source in zip((1, 2), sources)]
    labels = torch.zeros(batch, frames, 4, 4, dtype=torch.long)
    labels[0, :, :, 2:], labels[1, 2, 1:] = 1, 2
    labels[:, 1] = 255  # unlabelled: no rows there
    none = pair([], [])
    matches = [[MatchIndices(pair([4, 0], [0, 1]), none), MatchIndices(pair([2], [0]), none)]] * 2
    labelled = (labels != 255).flatten(2).any(2).numpy()
    result = BatchMatch(matches, [np.array([0, 1]), np.array([2])], labelled)
    rows = assign(result, queries=queries, num_classes=3, device=torch.device("cpu")).primary
    assert rows.groups == [4, 0, 4, 2, 0, 2] and rows.frame.ne(1).all()
    upstream = torch.randn(len(rows.set), h, w, generator=gen, dtype=torch.float64)
    got = gather(kept, rows)
    indexed = gather([PredictionSet(s.class_logits, s.mask_logits) for s in kept], rows)
    torch.testing.assert_close(got, indexed.float(), rtol=0, atol=0)
    grads = torch.autograd.grad(got, (embeddings, features), upstream.float())
    plain = torch.autograd.grad(indexed, (embeddings, features), upstream)
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
