"""Segmentation metrics on a site's test split: Dice, IoU and HD95 per image (MONAI metrics).

Conventions, chosen so that every image gets a finite number:

* predictions are ``sigmoid(logits) > 0.5``;
* Dice and IoU of an empty prediction against an empty mask are 1 (MONAI ``ignore_empty=False``);
* HD95 (pixels) is 0 when both are empty and the image diagonal (the worst possible value) when
  exactly one of them is empty, instead of MONAI's inf/nan; such images are counted in
  ``empty_predictions``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from torch import nn

__all__ = ["SegmentationScores", "evaluate_segmenter", "predict_masks", "score_masks"]


@dataclass(frozen=True)
class SegmentationScores:
    """Per-image scores of one model on one set of images (arrays of length N)."""

    dice: np.ndarray
    iou: np.ndarray
    hd95: np.ndarray
    empty_predictions: int

    @property
    def n(self) -> int:
        return int(self.dice.shape[0])

    def summary(self) -> dict[str, float]:
        """Means and standard deviations as plain floats (JSON-able); ``n`` is the image count."""
        out: dict[str, float] = {"n": float(self.n), "empty_predictions": float(self.empty_predictions)}
        for name in ("dice", "iou", "hd95"):
            values = getattr(self, name)
            out[name] = float(values.mean()) if values.size else float("nan")
            out[f"{name}_std"] = float(values.std()) if values.size else float("nan")
        return out


@torch.no_grad()
def predict_masks(
    segmenter: nn.Module, images: np.ndarray | torch.Tensor, *, device: torch.device, batch_size: int = 32
) -> torch.Tensor:
    """Binary predictions (N, 1, H, W) in {0, 1} (float, on CPU) for images (N, C, H, W) in [-1, 1]."""
    was_training = segmenter.training
    segmenter.eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    preds = []
    try:
        for start in range(0, images.shape[0], batch_size):
            logits = segmenter(images[start : start + batch_size].to(device))
            preds.append((torch.sigmoid(logits) > 0.5).float().cpu())
    finally:
        segmenter.train(was_training)
    if not preds:
        return torch.zeros((0, 1, *images.shape[2:]))
    return torch.cat(preds)


def score_masks(pred: torch.Tensor, target: torch.Tensor) -> SegmentationScores:
    """Score binary predictions against binary masks, both (N, 1, H, W) in {0, 1}."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != mask shape {tuple(target.shape)}")
    n = pred.shape[0]
    if n == 0:
        empty = np.zeros(0)
        return SegmentationScores(empty, empty, empty, 0)
    pred, target = pred.float().cpu(), target.float().cpu()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, target)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pred, target)
    pred_empty = pred.flatten(1).sum(1) == 0
    target_empty = target.flatten(1).sum(1) == 0
    diagonal = math.hypot(*pred.shape[2:])
    hd95 = np.zeros(n)
    both = ~(pred_empty | target_empty)
    if both.any():
        metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        with warnings.catch_warnings():
            # MONAI 1.6 calls its own deprecated get_mask_edges argument; nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95[both.numpy()] = metric(pred[both], target[both]).flatten().numpy()
    hd95[(pred_empty ^ target_empty).numpy()] = diagonal
    return SegmentationScores(
        dice=dice.flatten().numpy().astype(float),
        iou=iou.flatten().numpy().astype(float),
        hd95=hd95,
        empty_predictions=int((pred_empty & ~target_empty).sum()),
    )


def evaluate_segmenter(
    segmenter: nn.Module,
    images: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 32,
) -> SegmentationScores:
    """Predict and score: images (N, C, H, W) in [-1, 1], masks (N, 1, H, W) in {0, 1}."""
    pred = predict_masks(segmenter, images, device=device, batch_size=batch_size)
    return score_masks(pred, torch.as_tensor(masks, dtype=torch.float32))
