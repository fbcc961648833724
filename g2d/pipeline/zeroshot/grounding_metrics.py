"""How well a heat map finds a phrase's region, the measures used for MS-CXR style phrase grounding.

- Pointing game: is the heat map's maximum inside the truth? A uniformly random point hits with
  probability area(truth) / area(image): that is the chance level reported beside it. With `within`
  (the body), only locations inside it compete, and chance is the truth's share of the body.
- IoU and Dice of the heat map binarised at a threshold on its [0, 1]-scaled values (MONAI's metrics);
  the threshold is chosen on val (best mean Dice) and only then applied to test.
- Contrast-to-noise ratio, as BioViL defines it for MS-CXR: |mean inside - mean outside| divided by
  sqrt(var inside + var outside), on the raw similarities. It does not depend on any threshold. As it
  takes the absolute contrast, a map unrelated to the truth still scores above 0: the stage reports
  that level (each mask against another image's map) beside it.

Every function takes heat maps (N, H, W) and boolean truths (N, H, W) and returns per-target values.
"""

from __future__ import annotations

import torch


def pointing_hits(heat: torch.Tensor, truth: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: the arg-max location (the first on ties), among those `within` when given, lies inside
    the truth."""
    if within is not None:
        heat = heat.masked_fill(~within, float("-inf"))
    where = heat.flatten(1).argmax(1)
    return truth.flatten(1)[torch.arange(len(where)), where]


def pointing_chance(truth: torch.Tensor, within: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) the hit probability of a uniformly random point (inside `within` when given): the truth's
    share of the image (or of `within`)."""
    if within is None:
        return truth.flatten(1).float().mean(1)
    inside = within.flatten(1)
    return (truth.flatten(1) & inside).sum(1).float() / inside.sum(1).clamp_min(1).float()


def overlap(heat01: torch.Tensor, truth: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU, Dice), each (N,), of `heat01 >= threshold` against the truth."""
    from monai.metrics import compute_dice, compute_iou

    pred = (heat01 >= threshold).float().unsqueeze(1).cpu()
    true = truth.float().unsqueeze(1).cpu()
    iou = compute_iou(pred, true, include_background=True, ignore_empty=False)[:, 0]
    dice = compute_dice(pred, true, include_background=True, ignore_empty=False)[:, 0]
    return iou, dice


def cnr(heat: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N,) contrast-to-noise ratio of the map inside vs outside the truth (population variances);
    NaN where the truth is empty or covers the whole image, or where both sides are constant."""
    flat, inside = heat.flatten(1).double(), truth.flatten(1)
    n_in, n_out = inside.sum(1), (~inside).sum(1)
    mean_in = (flat * inside).sum(1) / n_in
    mean_out = (flat * ~inside).sum(1) / n_out
    var_in = (((flat - mean_in[:, None]) ** 2) * inside).sum(1) / n_in
    var_out = (((flat - mean_out[:, None]) ** 2) * ~inside).sum(1) / n_out
    noise = (var_in + var_out).sqrt()
    out = (mean_in - mean_out).abs() / noise.clamp_min(1e-12)
    return torch.where((n_in > 0) & (n_out > 0) & (noise > 1e-12), out, torch.nan).float()


def choose_threshold(heat01: torch.Tensor, truth: torch.Tensor,
                     thresholds: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """The candidate with the best mean Dice (the lowest on ties), and every candidate's mean Dice."""
    scores = {t: float(overlap(heat01, truth, t)[1].mean()) for t in thresholds}
    best = max(scores.values())
    return min(t for t, s in scores.items() if s == best), scores
