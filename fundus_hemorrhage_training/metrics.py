"""Segmentation metrics at full resolution, inside the field of view.

Scores are the served uint8 probabilities (round(255 p)), so pixel AUPR is computed exactly from
256-bin histograms that pool over photos: the same value scikit-learn's average_precision_score gives
on the concatenated pixels, at a fraction of the memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np


def average_precision_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over thresholds from the highest score down (sklearn's definition)."""
    pos, neg = np.asarray(pos, np.float64)[::-1], np.asarray(neg, np.float64)[::-1]
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    total = tp[-1]
    if total == 0:
        return float("nan")
    seen = (pos + neg) > 0
    tp, fp = tp[seen], fp[seen]
    precision = tp / (tp + fp)
    recall = tp / total
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def components(binary: np.ndarray) -> tuple[int, np.ndarray]:
    count, labels = cv2.connectedComponents(binary.astype(np.uint8), connectivity=8)
    return count - 1, labels


def lesion_matches(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(truth lesions hit, truth lesions, predicted lesions that hit truth, predicted lesions), by any overlap."""
    n_true, true_labels = components(truth)
    n_pred, pred_labels = components(pred)
    overlap = (truth > 0) & (pred > 0)
    hit_true = np.unique(true_labels[overlap]).size
    hit_pred = np.unique(pred_labels[overlap]).size
    return hit_true, n_true, hit_pred, n_pred


@dataclass
class SegmentationScores:
    """Accumulates photos; `summary()` gives pooled AUPR, Dice and lesion-level scores."""

    thresholds: tuple[int, ...] = ()  # uint8 levels at which Dice is also tracked (threshold choice)
    pos: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    dice_per_image: list = field(default_factory=list)
    lesions: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))
    overlap: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # pooled |pred & truth|, |pred|+|truth|

    def add(self, prob8: np.ndarray, truth: np.ndarray, fov: np.ndarray, pred_mask: np.ndarray) -> None:
        inside = fov > 0
        truth = (truth > 0) & inside
        self.pos += np.bincount(prob8[truth], minlength=256)
        self.neg += np.bincount(prob8[inside & ~truth], minlength=256)
        pred = (pred_mask > 0) & inside
        inter, total = np.count_nonzero(pred & truth), np.count_nonzero(pred) + np.count_nonzero(truth)
        self.dice_per_image.append(2.0 * inter / total if total else 1.0)
        self.overlap += (inter, total)
        self.lesions += lesion_matches(truth, pred)

    def dice_at(self, level: int) -> float:
        """Pooled Dice if every pixel with probability level >= `level` were called a lesion."""
        tp = self.pos[level:].sum()
        fp = self.neg[level:].sum()
        fn = self.pos[:level].sum()
        return float(2 * tp / max(1, 2 * tp + fp + fn))

    def summary(self) -> dict:
        hit_true, n_true, hit_pred, n_pred = (int(v) for v in self.lesions)
        return {
            "pixel_aupr": average_precision_from_histograms(self.pos, self.neg),
            "dice": float(2 * self.overlap[0] / self.overlap[1]) if self.overlap[1] else float("nan"),
            "dice_mean": float(np.mean(self.dice_per_image)) if self.dice_per_image else float("nan"),
            "lesion_sensitivity": hit_true / n_true if n_true else float("nan"),
            "lesion_precision": hit_pred / n_pred if n_pred else float("nan"),
            "lesions_true": n_true,
            "lesions_predicted": n_pred,
            "images": len(self.dice_per_image),
        }

    def best_threshold(self) -> tuple[float, float]:
        """Threshold (probability) maximising pooled Dice, and that Dice."""
        dices = [self.dice_at(level) for level in range(1, 256)]
        best = int(np.argmax(dices))
        return (best + 1) / 255.0, dices[best]
