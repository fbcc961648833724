"""The paper's own numbers, printed beside the study's SIIM / RSNA / CheXpert-like tables for reference.

Source: Liu et al., "G2D: From Global to Dense Radiography Representation Learning via Vision-Language
Pre-training", NeurIPS 2024 camera-ready (proceedings.neurips.cc, paper 1ac14e44228aeadabb3c934822c1212a;
arXiv 2312.01522 latest version), copied as printed. The paper trains on MIMIC-CXR (213k pairs, ResNet-50,
ClinicalBERT, 50 epochs on 16 A100s) and tests on the real SIIM, RSNA and CheXpert data; SynthCXR is rendered
and tiny, so only the orderings of rows can be compared, never the values.

Keys: (task, fraction) -> value x 100, per row name of the study's tables. "global" is the paper's ConVIRT
row (its only global-only image-text baseline). The ablation tables (5a, 5b, 5d, 5e, 5f, 8) report SIIM Dice,
RSNA mAP and CXR14 AUC without naming the label fraction; their full-G2D row equals the 1% results (SIIM
Dice of Table 1's encoder + decoder row, RSNA mAP of Table 1, CXR14 AUC of Table 3), so they are listed here
as 1%, SIIM with encoder + decoder transfer, which is how the study runs its ablations (params
study.transfer). The study does not fine-tune on CXR14, so that column is left out."""

from __future__ import annotations

SOURCE = ("Liu et al., G2D, NeurIPS 2024 (camera-ready); MIMIC-CXR pre-training, real SIIM / RSNA / CheXpert "
          "test sets")

# Table 1 (Dice, mAP) and Table 4 (linear-probe AUC): rows random / global (ConVIRT) / g2d (encoder transfer)
TABLE_1_4: dict[str, dict[tuple[str, float], float]] = {
    "random": {("siim-seg", 0.01): 9.0, ("siim-seg", 0.1): 28.6, ("siim-seg", 1.0): 54.3,
               ("rsna-seg", 0.01): 6.9, ("rsna-seg", 0.1): 10.6, ("rsna-seg", 1.0): 18.5,
               ("rsna-det", 0.01): 1.0, ("rsna-det", 0.1): 4.0, ("rsna-det", 1.0): 8.9,
               ("chexpert-cls", 0.01): 56.1, ("chexpert-cls", 0.1): 62.6, ("chexpert-cls", 1.0): 65.7},
    "global": {("siim-seg", 0.01): 25.0, ("siim-seg", 0.1): 43.2, ("siim-seg", 1.0): 59.9,
               ("rsna-seg", 0.01): 55.0, ("rsna-seg", 0.1): 67.4, ("rsna-seg", 1.0): 67.5,
               ("rsna-det", 0.01): 8.2, ("rsna-det", 0.1): 15.6, ("rsna-det", 1.0): 17.9,
               ("chexpert-cls", 0.01): 85.9, ("chexpert-cls", 0.1): 86.8, ("chexpert-cls", 1.0): 87.3},
    "g2d": {("siim-seg", 0.01): 62.6, ("siim-seg", 0.1): 63.1, ("siim-seg", 1.0): 66.8,
            ("rsna-seg", 0.01): 70.9, ("rsna-seg", 0.1): 72.6, ("rsna-seg", 1.0): 75.1,
            ("rsna-det", 0.01): 15.9, ("rsna-det", 0.1): 21.7, ("rsna-det", 1.0): 27.2,
            ("chexpert-cls", 0.01): 89.7, ("chexpert-cls", 0.1): 90.4, ("chexpert-cls", 1.0): 91.1},
}

# Table 1's last two rows: G2D with the encoder transferred, and with encoder + pre-trained decoder
TRANSFER: dict[str, dict[tuple[str, float], float]] = {
    "encoder": {("siim-seg", 0.01): 62.6, ("siim-seg", 0.1): 63.1, ("siim-seg", 1.0): 66.8,
                ("rsna-seg", 0.01): 70.9, ("rsna-seg", 0.1): 72.6, ("rsna-seg", 1.0): 75.1},
    "encoder-decoder": {("siim-seg", 0.01): 65.6, ("siim-seg", 0.1): 66.9, ("siim-seg", 1.0): 68.4,
                        ("rsna-seg", 0.01): 72.8, ("rsna-seg", 0.1): 73.4, ("rsna-seg", 1.0): 76.9},
}

# Ablations (Tables 5a, 5b, 5d, 5e, 5f and 8), SIIM Dice / RSNA mAP, mean over the paper's runs (its ± omitted)
_REFERENCE = {("siim-seg", 0.01): 65.6, ("rsna-det", 0.01): 15.9}
ABLATIONS: dict[str, dict[tuple[str, float], float]] = {
    "g2d": _REFERENCE,
    "dense-none": {("siim-seg", 0.01): 49.2, ("rsna-det", 0.01): 11.7},
    "dense-reconstruction": {("siim-seg", 0.01): 53.4, ("rsna-det", 0.01): 13.0},
    "threshold-75": {("siim-seg", 0.01): 63.0, ("rsna-det", 0.01): 14.1},
    "threshold-median": {("siim-seg", 0.01): 58.8, ("rsna-det", 0.01): 12.5},
    "no-head-aggregation": {("siim-seg", 0.01): 62.1, ("rsna-det", 0.01): 13.5},
    "no-body-mask": {("siim-seg", 0.01): 63.4, ("rsna-det", 0.01): 15.3},
    "no-smoothing": {("siim-seg", 0.01): 64.1, ("rsna-det", 0.01): 15.2},
    "shuffled-masks": {("siim-seg", 0.01): 50.9, ("rsna-det", 0.01): 7.6},
    "heads-1": {("siim-seg", 0.01): 63.4, ("rsna-det", 0.01): 14.2},
    "heads-2": {("siim-seg", 0.01): 64.7, ("rsna-det", 0.01): 15.1},
    "heads-3": _REFERENCE,  # the paper's default has 3 heads
    "heads-4": {("siim-seg", 0.01): 65.3, ("rsna-det", 0.01): 15.4},
}


def paper_value(table: dict[str, dict[tuple[str, float], float]], row: str, task: str, frac: float) -> float | None:
    return table.get(row, {}).get((task, float(frac)))
