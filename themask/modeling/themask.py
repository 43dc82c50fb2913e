"""The THE-Mask network: MiT backbone → pixel decoder → transformer decoder (docs/DESIGN.md
§1–4). Normalised inputs are zero-padded to a multiple of ``size_divisor``; scores are cropped."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.data.resize import aligned_size
from themask.modeling.config import ModelConfig
from themask.modeling.outputs import FrameFeatures, Predictions
from themask.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from themask.modeling.transformer import QueryDecoder
from themask.precision import in_float32


def semantic_map(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Semantic inference (docs/DESIGN.md §4.3): class_logits (B, N, K+1) or (B, T, N, K+1),
    mask_logits (B, N, T, h, w) → Σ_q softmax(class)[..., :K] · sigmoid(mask) (B, T, K, h, w),
    classes innermost in memory (each pixel's K scores together, as the upsampling wants)."""
    probs = class_logits.softmax(dim=-1)[..., :-1]
    masks = mask_logits.sigmoid()
    batch, queries, frames, height, width = masks.shape
    if probs.dim() == 3:  # one class per clip query: (B, T·h·w, N) @ (B, N, K), no copy
        scores = torch.bmm(masks.flatten(2).transpose(1, 2), probs)
    else:  # one class per frame query: (B·T, h·w, N) @ (B·T, N, K)
        pixels = masks.permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, queries)
        scores = torch.bmm(pixels, probs.flatten(0, 1))
    return scores.view(batch, frames, height, width, -1).permute(0, 1, 4, 2, 3)


class THEMask(nn.Module):
    """THE-Mask (or Mask2Former's single-frame decoder) on clips (B, T, 3, H, W)."""

    def __init__(
        self,
        *,
        config: ModelConfig,
        backbone: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        decoder: QueryDecoder,
    ):
        super().__init__()
        self.config, self.backbone = config, backbone
        self.pixel_decoder, self.decoder = pixel_decoder, decoder

    @property
    def is_temporal(self) -> bool:
        """True for the TAD (B clips of T frames), False for the single-frame decoder."""
        return self.decoder.is_temporal

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the decoders' layer activations in the backward pass (less memory)."""
        self.pixel_decoder.checkpoint_layers = enabled
        self.decoder.checkpoint_layers = enabled

    def encode(self, frames: Tensor) -> FrameFeatures:
        """frames (B, T, 3, H, W), normalised → ``FrameFeatures`` of the B·T frames
        (zero-padded on the bottom/right to a multiple of ``size_divisor``)."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(
                f"THEMask.encode: expected frames (B, T, 3, H, W), got {tuple(frames.shape)}"
            )
        height, width = frames.shape[-2:]
        padded_h, padded_w = aligned_size((height, width), None, self.config.size_divisor)
        images = frames.flatten(0, 1)  # (B·T, 3, H, W)
        if (padded_h, padded_w) != (height, width):
            images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
        if images.device.type == "cpu" and not torch.is_grad_enabled():
            # CPU inference one frame at a time: 2 × 664 ms instead of 1653 ms for two 480² frames
            return FrameFeatures.cat([self._encode_images(image[None]) for image in images])
        return self._encode_images(images)

    def _encode_images(self, images: Tensor) -> FrameFeatures:
        return self.pixel_decoder(self.backbone(images))

    def decode(self, features: FrameFeatures, batch: int, frames: int) -> Predictions:
        """Decoder on the features of B clips of T frames (frame t of clip b at b·T + t); all
        prediction sets in train mode, else the final one."""
        if len(features) != batch * frames:
            raise ValueError(
                f"THEMask.decode: features hold {len(features)} frames, expected "
                f"batch × frames = {batch} × {frames}"
            )
        mask_features, multi_scale = features.mask_features, features.multi_scale
        if self.training or not torch.is_autocast_enabled(mask_features.device.type):
            return self.decoder(mask_features, multi_scale, frames=frames, return_all=self.training)
        return in_float32(  # inference under autocast
            lambda m, *ms: self.decoder(m, ms, frames=frames, return_all=False),
            mask_features,
            *multi_scale,
        )

    @staticmethod
    def stride4_scores(predictions: Predictions) -> Tensor:
        """Class scores (B, T, K, H'/4, W'/4) of the final set, 0.5 · clip + 0.5 · frame head
        with a frame head (docs/DESIGN.md §4.3); float32 under autocast (bf16 flips argmaxes)."""
        heads = [predictions.final] + ([predictions.frame[-1]] if predictions.frame else [])
        with torch.autocast(heads[0].mask_logits.device.type, enabled=False):
            maps = [semantic_map(s.class_logits.float(), s.mask_logits.float()) for s in heads]
        scores = maps[0] if len(maps) == 1 else 0.5 * maps[0] + 0.5 * maps[1]  # (B', T', K, h, w)
        clips, clip_len = scores.shape[:2]
        if clip_len == 1 and predictions.frames_per_clip > 1:  # single-frame layout → (B, T)
            clips, clip_len = clips // predictions.frames_per_clip, predictions.frames_per_clip
        return scores.reshape(clips, clip_len, *scores.shape[2:])

    def semantic_scores(self, predictions: Predictions, image_size: tuple[int, int]) -> Tensor:
        """Class scores (B, T, K, H, W) at ``image_size`` = (H, W): ``stride4_scores`` upsampled
        bilinearly to the padded size and cropped; a channels-last view (classes innermost).
        ``predictions`` passed as a temporary (``semantic_scores(model.decode(...), size)``) are
        freed before the full-size scores are made (CPython 3.11+ hands arguments over)."""
        scores = self.stride4_scores(predictions)
        del predictions
        clips, clip_len, classes, low_h, low_w = scores.shape
        height, width = image_size
        padded = aligned_size((height, width), None, self.config.size_divisor)
        if (padded[0] // 4, padded[1] // 4) != (low_h, low_w):
            raise ValueError(
                f"THEMask.semantic_scores: masks of {low_h}×{low_w} (stride 4) do not come from "
                f"an input of {height}×{width} (padded {padded[0]}×{padded[1]})"
            )
        # classes innermost: upsampling and the caller's argmax 1.5-3× faster on CPU. There a
        # copy (it lands in a hole the network freed, and the output can start lower in the
        # heap: ARCHITECTURE.md, "CPU products and memory"); semantic_map wrote that layout
        scores = scores.reshape(-1, classes, low_h, low_w)  # no name may keep it past the copy
        scores = (scores.clone if scores.device.type == "cpu" else scores.contiguous)(
            memory_format=torch.channels_last
        )
        with torch.autocast(scores.device.type, enabled=False):
            scores = F.interpolate(scores, size=padded, mode="bilinear", align_corners=False)
        scores = scores[..., :height, :width]
        return scores.reshape(clips, clip_len, classes, height, width)

    def forward(self, frames: Tensor) -> Predictions | Tensor:
        """frames (B, T, 3, H, W), normalised → ``Predictions`` (train) or scores
        (B, T, K, H, W) (eval)."""
        batch, clip_len = frames.shape[:2]
        if self.training:
            return self.decode(self.encode(frames), batch, clip_len)
        size = (frames.shape[-2], frames.shape[-1])
        return self.semantic_scores(self.decode(self.encode(frames), batch, clip_len), size)
