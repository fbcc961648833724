"""The downstream metrics, as the paper's protocols define them, computed by MONAI.

- Dice per image at a threshold, averaged over images; an image with an empty truth scores 1 when the
  prediction is empty too and 0 otherwise (MONAI's `ignore_empty=False`), as in the SIIM protocol.
- Macro AUC over the classes that have both outcomes in the split (the others are counted, not hidden).
- mAP over IoU 0.4:0.05:0.75 (the paper's RSNA / Object-CXR protocol), COCO-style, MONAI's COCOMetric.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAP_IOU_RANGE = (0.4, 0.75, 0.05)


def dice_per_image(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N,) Dice of binary (N, 1, H, W) masks, empty-vs-empty = 1."""
    from monai.metrics import compute_dice

    return compute_dice(pred.float().cpu(), truth.float().cpu(), include_background=True, ignore_empty=False)[:, 0]


def segmentation_scores(probs: torch.Tensor, truth: torch.Tensor, threshold: float) -> dict[str, float]:
    pred = probs > threshold
    return {**dice_scores(dice_per_image(pred, truth), truth), "dice_pooled": pooled_dice(pred, truth)}


def pooled_dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Foreground Dice of all the split's pixels at once: empty images add nothing, so predicting nothing
    scores 0 here however many empty images there are (per-image Dice gives each of them 1)."""
    pred, truth = pred.bool(), truth.bool()
    total = int(pred.sum()) + int(truth.sum())
    return 2 * int((pred & truth).sum()) / total if total else math.nan


def dice_scores(dice: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean Dice over images, and apart over those with and without a finding."""
    positive = truth.flatten(1).any(1).to(dice.device)  # truth may be on the GPU, MONAI's Dice is on the CPU
    out = {"dice": float(dice.mean()), "images": int(len(dice))}
    if positive.any():
        out["dice_positive"] = float(dice[positive].mean())
    if (~positive).any():
        out["empty_correct"] = float(dice[~positive].mean())  # share of empty truths predicted empty
    return out


def auc_scores(scores: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """Per-class ROC AUC on the rows whose label is known, and their macro mean."""
    from monai.metrics import compute_roc_auc

    scores, labels = scores.float().cpu(), labels.cpu()
    out: dict[str, float] = {}
    per_class = []
    for c, name in enumerate(classes):
        known = ~torch.isnan(labels[:, c])
        y = labels[known, c]
        if y.numel() == 0 or y.min() == y.max():
            out[f"auc_{name}"] = math.nan  # one outcome only: AUC undefined
            continue
        auc = float(compute_roc_auc(scores[known, c].float(), y.long()))
        out[f"auc_{name}"] = auc
        per_class.append(auc)
    out["auc"] = float(np.mean(per_class)) if per_class else math.nan
    out["auc_classes"] = len(per_class)
    out["auc_classes_undefined"] = len(classes) - len(per_class)
    return out


def accuracy_scores(scores: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float]:
    """Multi-class: accuracy of the arg-max, plus one-vs-rest macro AUC."""
    scores, labels = scores.float().cpu(), labels.cpu()
    truth = labels.argmax(1)
    out = {"accuracy": float((scores.argmax(1) == truth).float().mean())}
    out.update(auc_scores(torch.softmax(scores.float(), 1), labels, classes))
    return out


def mean_ap(predictions: list[dict[str, torch.Tensor]], boxes: list[torch.Tensor], labels: list[torch.Tensor],
            classes: tuple[str, ...], max_detections: int) -> dict[str, float]:
    """mAP over IoU 0.4:0.05:0.75 and AP at IoU 0.5, class indices from 1 (torchvision's convention)."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    metric = COCOMetric(classes=list(classes), iou_list=(0.5,), iou_range=MAP_IOU_RANGE,
                        max_detection=(max_detections,), verbose=False)
    matched = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[p["boxes"].detach().cpu().numpy() for p in predictions],
        pred_classes=[p["labels"].detach().cpu().numpy() - 1 for p in predictions],
        pred_scores=[p["scores"].detach().cpu().numpy() for p in predictions],
        gt_boxes=[b.cpu().numpy() for b in boxes], gt_classes=[lab.cpu().numpy() - 1 for lab in labels],
        max_detections=max_detections)
    values = metric(matched)[0]
    lo, hi, step = MAP_IOU_RANGE

    def value(key: str) -> float:  # MONAI writes -1 where there is no truth box to score against
        v = float(values[key])
        return math.nan if v < 0 else v

    return {"map": value(f"mAP_IoU_{lo:.2f}_{hi:.2f}_{step:.2f}_MaxDet_{max_detections}"),
            "ap50": value(f"AP_IoU_0.50_MaxDet_{max_detections}"),
            "images": len(boxes), "boxes": int(sum(len(b) for b in boxes))}
