"""Training targets (docs/DESIGN.md §5, §8), on the labels' device with fixed shapes: the
classes of a clip, each with the mask ``labels == class`` per frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from themask.data.vspw import IGNORE_INDEX


@dataclass
class BatchTargets:
    """labels (B, T, H, W) class ids (uint8 for K < 255), 255 = ignore; present (B, K) bool;
    labelled (B, T) bool; invalid (2,) int64: how many values are not ignore nor in [0, K), one."""

    labels: Tensor
    present: Tensor
    labelled: Tensor
    invalid: Tensor

    def masks(self, clip: Tensor, frame: Tensor, classes: Tensor) -> Tensor:
        """GT masks of (clip, frame, class) triples, each (R,) int64: (R, H, W) float32."""
        return (self.labels[clip, frame] == classes.view(-1, 1, 1).to(self.labels.dtype)).float()

    def cell_counts(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """GT pixels per class in each cell of an (h, w) map upsampled by nearest
        interpolation → (B, T, K+1, h, w) (last: ignore, invalid) and cell sizes (h, w)."""
        batch, frames, big_h, big_w = self.labels.shape
        num_classes, device = self.present.shape[1], self.labels.device
        cells = torch.arange(height * width, device=device, dtype=torch.float32)
        cell_map = F.interpolate(cells.view(1, 1, height, width), (big_h, big_w), mode="nearest")
        cell_of_pixel = cell_map.long().view(-1)  # (H·W,) the low-resolution cell of each pixel
        labels = self.labels.long().flatten(2)  # (B, T, H·W)
        classes = torch.where(labels < num_classes, labels, num_classes)
        index = classes * (height * width) + cell_of_pixel  # (B, T, H·W)
        counts = torch.zeros(batch, frames, (num_classes + 1) * height * width, device=device)
        counts.scatter_add_(2, index, torch.ones_like(index, dtype=torch.float32))
        ones = torch.ones_like(cell_of_pixel, dtype=torch.float32)
        sizes = torch.zeros(height * width, device=device).index_add_(0, cell_of_pixel, ones)
        return counts.view(batch, frames, -1, height, width), sizes.view(height, width)


def build_targets(labels: Tensor, num_classes: int) -> BatchTargets:
    """Targets of label maps (B, T, H, W) of class ids in [0, K) or 255; invalid values are
    counted for ``check_invalid``, not raised (that would wait for the device)."""
    if labels.dim() != 4:
        raise ValueError(f"labels must have shape (B, T, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= num_classes))
    flat_bad = bad.flatten()
    first = flat_bad.int().argmax().view(1)  # first invalid value, if any (gather: no sync)
    invalid = torch.cat([flat_bad.sum().view(1), labels.flatten().gather(0, first)])
    # class ids, with ignore and invalid values sent to an extra column K
    columns = torch.where(valid & ~bad, labels, num_classes).flatten(1)  # (B, T·H·W)
    present = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, columns, True)
    return BatchTargets(  # labels compact; invalid values may wrap (the matching stops the step)
        labels=labels.to(torch.uint8 if num_classes < IGNORE_INDEX else torch.int32),
        present=present[:, :num_classes],
        labelled=valid.flatten(2).any(-1),
        invalid=invalid,
    )


def check_invalid(count: int, value: int, num_classes: int) -> None:
    """Raise for labels that held ``count`` invalid values (``value`` one of them)."""
    if count > 0:
        expected = f"class ids in [0, {num_classes}) or {IGNORE_INDEX} (ignore)"
        raise ValueError(f"labels hold value {value}; expected {expected}")
