from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from naive import match_one_set, naive_bilinear

from themask.loss.matcher import HungarianMatcher, match_two_rounds, pairwise_bce_dice
from themask.loss.targets import build_targets
from themask.rng import uniform


def brute_force(cost, rows):
    """Minimum-cost injective assignment of min(len(rows), M) pairs over the given rows."""
    num_targets = cost.shape[1]
    best, best_pairs = math.inf, set()
    if len(rows) >= num_targets:
        candidates = (
            list(zip(chosen, range(num_targets)))
            for chosen in itertools.permutations(rows, num_targets)
        )
    else:
        candidates = (
            list(zip(rows, chosen))
            for chosen in itertools.permutations(range(num_targets), len(rows))
        )
    for pairs in candidates:
        total = sum(cost[q, t] for q, t in pairs)
        if total < best - 1e-12:
            best, best_pairs = total, set(pairs)
    return best, best_pairs


def pairs_of(index_pair):
    query, target = index_pair
    return set(zip(query.tolist(), target.tolist()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("queries,targets", [(6, 2), (6, 3), (5, 4), (4, 3), (3, 3)])
def test_both_rounds_equal_brute_force(seed, queries, targets):
    rng = np.random.default_rng(seed)
    cost = rng.random((queries, targets))
    second = rng.random((queries, targets))
    for second_cost in (None, second):
        match = match_two_rounds(torch.as_tensor(cost), second_round_cost=second_cost)
        _, expected_primary = brute_force(cost, list(range(queries)))
        assert pairs_of(match.primary) == expected_primary
        free = [q for q in range(queries) if q not in {q for q, _ in expected_primary}]
        round2 = cost if second_cost is None else second
        _, expected_secondary = brute_force(round2, free)
        assert pairs_of(match.secondary) == expected_secondary
        # rounds are disjoint and every target appears at most once per round
        assert not set(match.primary[0].tolist()) & set(match.secondary[0].tolist())
        assert len(set(match.secondary[1].tolist())) == len(match.secondary[1])
        assert len(match.secondary[0]) == min(targets, queries - targets)


def test_more_targets_than_free_queries_matches_as_many_as_possible():
    rng = np.random.default_rng(3)
    cost = rng.random((5, 4))
    match = match_two_rounds(cost)
    assert len(match.primary[0]) == 4
    assert len(match.secondary[0]) == 1  # only one query is left for round 2
    free = [q for q in range(5) if q not in match.primary[0].tolist()]
    _, expected = brute_force(cost, free)
    assert pairs_of(match.secondary) == expected


def test_more_targets_than_queries():
    cost = np.random.default_rng(1).random((2, 5))
    match = match_two_rounds(cost)
    assert len(match.primary[0]) == 2 and len(match.secondary[0]) == 0
    _, expected = brute_force(cost, [0, 1])
    assert pairs_of(match.primary) == expected


def test_no_targets_gives_empty_matches():
    match = match_two_rounds(np.zeros((4, 0)))
    for query, target in (match.primary, match.secondary):
        assert query.numel() == 0 and target.numel() == 0
        assert query.dtype == torch.long


def test_one_round_has_no_secondary():
    match = match_two_rounds(np.random.default_rng(0).random((5, 2)), num_rounds=1)
    assert len(match.primary[0]) == 2 and len(match.secondary[0]) == 0


def naive_bce_dice(pred, gt):
    sig = [1 / (1 + math.exp(-v)) for v in pred]
    bce = sum(-(g * math.log(s) + (1 - g) * math.log(1 - s)) for s, g in zip(sig, gt)) / len(gt)
    dice = 1 - (2 * sum(s * g for s, g in zip(sig, gt)) + 1) / (sum(sig) + sum(gt) + 1)
    return bce, dice


def test_pairwise_costs_equal_naive_loops_and_leave_out_weightless_points():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    targets = (torch.rand(2, 7, 2) > 0.5).float()
    weight = torch.ones(2, 7)
    weight[1, 4:] = 0  # points 4..6 of clip 1 are left out
    targets[1, 4:] = 0
    bce, dice = pairwise_bce_dice(logits.transpose(1, 2), targets, weight)  # (B, L, N) in
    for b in range(2):
        kept = [p for p in range(7) if weight[b, p] > 0]
        for q in range(3):
            for m in range(2):
                naive = naive_bce_dice(
                    [logits[b, q, p].item() for p in kept], [targets[b, p, m].item() for p in kept]
                )
                assert bce[b, q, m].item() == pytest.approx(naive[0], rel=1e-5)
                assert dice[b, q, m].item() == pytest.approx(naive[1], rel=1e-5)


@pytest.mark.parametrize("all_class_columns", [False, True])
@pytest.mark.parametrize("frames", [1, 3])
def test_matcher_cost_equals_naive_cost_at_the_drawn_points(frames, all_class_columns):
    torch.manual_seed(1)
    batch, queries, classes, points, sets = 2, 4, 3, 5, 2
    class_logits = torch.randn(sets, batch, queries, classes + 1)
    mask_logits = torch.randn(sets, batch, queries, frames, 3, 4)
    labels = torch.randint(0, classes, (batch, frames, 6, 8))
    labels[1, :, :3] = 255
    labels[0, 0, 0] = 2  # class 2 is present in clip 0 (at least in frame 0)
    labels[1] = labels[1].clamp(max=1)  # clip 1 holds classes 0, 1 only
    if frames == 3:
        labels[0, 1] = 255  # an unlabelled frame: left out of the cost
    targets = build_targets(labels, classes)
    matcher = HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=points,
        all_class_columns=all_class_columns,
    )
    torch.manual_seed(7)
    costs = matcher.costs(list(zip(class_logits, mask_logits)), targets)
    torch.manual_seed(7)
    coords = uniform(sets, batch, points, 2)  # the matcher's random draw
    assert costs.columns.shape[1] == (classes if all_class_columns else 3)
    for s, b in itertools.product(range(sets), range(batch)):
        present = sorted({int(v) for v in labels[b].flatten()} - {255})
        assert costs.columns[b][costs.valid[b]].tolist() == present
        kept = [t for t in range(frames) if (labels[b, t] != 255).any()]
        probs = class_logits[s, b].softmax(-1)
        for q in range(queries):
            pred = [
                naive_bilinear(mask_logits[s, b, q, t], *coords[s, b, p].tolist())
                for t in kept
                for p in range(points)
            ]
            for column, cls in enumerate(costs.columns[b].tolist()):
                if not costs.valid[b, column]:
                    continue
                gt = [
                    naive_bilinear((labels[b, t] == cls).float(), *coords[s, b, p].tolist())
                    for t in kept
                    for p in range(points)
                ]
                bce, dice = naive_bce_dice(pred, gt)
                expected = -2.0 * probs[q, cls].item() + 5.0 * bce + 5.0 * dice
                got_full, got_bce = costs.full[s, b, q, column], costs.bce[s, b, q, column]
                assert got_full.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
                assert got_bce.item() == pytest.approx(5.0 * bce, rel=1e-4, abs=1e-5)


def test_column_choices_give_the_same_matches():
    torch.manual_seed(2)
    labels = torch.randint(0, 4, (2, 2, 8, 8))
    labels[1, :, :, :4] = 255
    labels[1] = labels[1].clamp(max=2)
    targets = build_targets(labels, 6)
    sets = [(torch.randn(2, 7, 7), torch.randn(2, 7, 2, 4, 4) * 2) for _ in range(3)]
    results = []
    for all_class_columns in (False, True):
        matcher = HungarianMatcher(num_points=64, all_class_columns=all_class_columns)
        torch.manual_seed(3)
        results.append(matcher.match_sets(sets, targets))
    compact, dense = results
    assert [c.tolist() for c in compact.classes] == [c.tolist() for c in dense.classes]
    for compact_set, dense_set in zip(compact.matches, dense.matches):
        for a, b in zip(compact_set, dense_set):
            assert pairs_of(a.primary) == pairs_of(b.primary)
            assert pairs_of(a.secondary) == pairs_of(b.secondary)


def test_invalid_label_is_reported_by_the_matching():
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, 2, 3] = 9
    targets = build_targets(labels, 3)
    with pytest.raises(ValueError, match="value 9"):
        class_logits, mask_logits = torch.randn(1, 4, 4), torch.randn(1, 4, 1, 2, 2)
        match_one_set(HungarianMatcher(num_points=8), class_logits, mask_logits, targets)


def test_costs_are_float32_under_autocast():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (1, 1, 8, 8))
    targets = build_targets(labels, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        class_logits = torch.randn(1, 4, 4).bfloat16()
        mask_logits = torch.randn(1, 4, 1, 4, 4).bfloat16()
        costs = HungarianMatcher(num_points=16).costs([(class_logits, mask_logits)], targets)
    assert costs.full.dtype == torch.float32 and torch.isfinite(costs.full).all()


def test_matcher_finds_the_obvious_assignment_in_both_rounds():
    # class 0 = left half, class 1 = right half; queries 3, 1 predict them best, 0, 2 next best
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[..., 4:] = 1
    targets = build_targets(labels, 2)
    left = torch.full((8, 8), -8.0)
    left[:, :4] = 8.0
    right = -left
    mask_logits = torch.full((1, 6, 1, 8, 8), -8.0)
    mask_logits[0, 3, 0], mask_logits[0, 1, 0] = left, right
    mask_logits[0, 0, 0], mask_logits[0, 2, 0] = left * 0.3, right * 0.3
    class_logits = torch.zeros(1, 6, 3)
    class_logits[0, [3, 0], 0] = 5.0
    class_logits[0, [1, 2], 1] = 5.0
    torch.manual_seed(0)
    (match,) = match_one_set(HungarianMatcher(num_points=256), class_logits, mask_logits, targets)
    assert pairs_of(match.primary) == {(3, 0), (1, 1)}
    assert pairs_of(match.secondary) == {(0, 0), (2, 1)}


def test_bce_second_round_cost_uses_the_bce_matrix():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    targets = build_targets(labels, 3)
    class_logits = torch.randn(2, 6, 4) * 3
    mask_logits = torch.randn(2, 6, 1, 4, 4)
    matcher = HungarianMatcher(num_points=32, second_round_cost="bce")
    torch.manual_seed(1)
    matches = match_one_set(matcher, class_logits, mask_logits, targets)
    torch.manual_seed(1)
    costs = matcher.costs([(class_logits, mask_logits)], targets)
    differs = False
    for b, match in enumerate(matches):
        full, bce = costs.full[0, b], costs.bce[0, b]
        expected = match_two_rounds(full, second_round_cost=bce)
        assert pairs_of(match.primary) == pairs_of(expected.primary)
        assert pairs_of(match.secondary) == pairs_of(expected.secondary)
        differs |= pairs_of(match.secondary) != pairs_of(match_two_rounds(full).secondary)
    assert differs  # the example is one where the choice of round-2 cost matters
