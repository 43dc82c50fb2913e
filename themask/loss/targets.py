"""Training targets from label maps (DESIGN.md §5 "Targets", §8).

A clip's targets are the classes present in any of its frames (ignore = 255 excluded), each with
a binary mask over all T frames. Ignore pixels are 0 in every mask, so the point-sampled losses
treat them as background. The frame-head targets keep the clip's class list in every frame; a
class absent from a frame simply has an empty mask there (``ClipTargets.frame``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = 255


@dataclass
class ClipTargets:
    """Targets of one clip.

    classes: (M,) int64 class ids in [0, K), sorted ascending.
    masks:   (M, T, H, W) float32 in {0, 1}; ``masks[i, t]`` is where class ``classes[i]`` is in
             frame t.
    """

    classes: Tensor
    masks: Tensor

    @property
    def num_masks(self) -> int:
        return int(self.classes.shape[0])

    def frame(self, t: int) -> ClipTargets:
        """Frame-head targets of frame ``t``: the same classes, masks (M, 1, H, W)."""
        return ClipTargets(classes=self.classes, masks=self.masks[:, t : t + 1])


def build_targets(labels: Tensor, num_classes: int) -> list[ClipTargets]:
    """Turn label maps into per-clip targets.

    labels: (B, T, H, W) integer tensor of class ids in [0, K) or 255 (ignore).
    Returns a list of B ``ClipTargets`` (M_b classes each; M_b = 0 for an all-ignore clip).
    """
    if labels.dim() != 4:
        raise ValueError(f"labels must have shape (B, T, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels hold value {value}; expected class ids in [0, {num_classes}) "
            f"or {IGNORE_INDEX} (ignore)"
        )
    # one unique over (clip, class) keys for the whole batch: no loop over pixels
    batch = labels.shape[0]
    clip_ids = torch.arange(batch, device=labels.device).view(-1, 1, 1, 1).expand_as(labels)
    keys = torch.unique(clip_ids[valid] * num_classes + labels[valid])  # sorted
    key_clips, key_classes = keys // num_classes, keys % num_classes  # (ΣM,) each
    masks = labels[key_clips] == key_classes.view(-1, 1, 1, 1)  # (ΣM, T, H, W)
    counts = torch.bincount(key_clips, minlength=batch).tolist()
    return [
        ClipTargets(classes=classes, masks=clip_masks)
        for classes, clip_masks in zip(key_classes.split(counts), masks.float().split(counts))
    ]
