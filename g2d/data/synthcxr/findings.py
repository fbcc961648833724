"""From a report's MeSH terms to what SynthCXR draws and to its label columns.

An IU MeSH term reads `Head/attribute/attribute...`, e.g. `Opacity/lung/base/left` or
`Pleural Effusion/bilateral/small`. The head picks the kind of finding; the attributes give the
patient's side, the lung zone and the severity. Terms with no drawable counterpart (spine
degeneration, a tortuous aorta, ...) are counted by head, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

# MeSH head -> renderer kind. Heads with attribute conditions are handled in `_kind`.
HEAD_KIND = {
    "Opacity": "opacity",
    "Airspace Disease": "opacity",
    "Density": "opacity",
    "Infiltrate": "opacity",
    "Consolidation": "consolidation",
    "Pneumonia": "consolidation",
    "Pulmonary Atelectasis": "atelectasis",
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "effusion",
    "Pneumothorax": "pneumothorax",
    "Nodule": "nodule",
    "Mass": "nodule",
    "Calcified Granuloma": "granuloma",
    "Granuloma": "granuloma",
    "Granulomatous Disease": "granuloma",
    "Emphysema": "emphysema",
    "Pulmonary Emphysema": "emphysema",
    "Pulmonary Disease, Chronic Obstructive": "emphysema",
    "Lung, Hyperlucent": "emphysema",
    "Pulmonary Edema": "edema",
    "Pulmonary Congestion": "edema",
    "Catheters, Indwelling": "device",
    "Implanted Medical Device": "device",
    "Surgical Instruments": "device",
    "Medical Device": "device",
    "Tube, Inserted": "device",
    "Stents": "device",
    "Cicatrix": "scar",
    "Pulmonary Fibrosis": "scar",
}

# Label columns of the classification task: column -> the renderer kinds that set it.
LABELS: dict[str, tuple[str, ...]] = {
    "opacity": ("opacity", "consolidation"),
    "atelectasis": ("atelectasis",),
    "cardiomegaly": ("cardiomegaly",),
    "effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule", "granuloma"),
    "consolidation": ("consolidation",),
    "emphysema": ("emphysema",),
    "edema": ("edema",),
    "device": ("device",),
}
LABEL_COLUMNS = ("normal", *LABELS)  # normal = nothing drawn at all

ZONES = {
    "upper lobe": "upper", "apex": "upper", "apices": "upper",
    "middle lobe": "middle", "lingula": "middle", "hilum": "middle",
    "base": "lower", "lower lobe": "lower", "retrocardiac": "lower", "costophrenic angle": "lower",
    "cardiophrenic angle": "lower", "paratracheal": "upper",
    "diffuse": "diffuse", "scattered": "diffuse", "multiple": "diffuse",
}
SEVERITY = {"borderline": 0.25, "mild": 0.33, "small": 0.33, "moderate": 0.66, "severe": 1.0, "large": 1.0}
BILATERAL_KINDS = ("cardiomegaly", "emphysema", "edema")
# Devices placed on these structures are midline (tubes, sternotomy wires, valves): drawn as the
# renderer's bilateral device, an endotracheal + enteric tube near the midline.
MIDLINE = {"mediastinum", "trachea", "trachea, carina", "heart", "heart atria", "aortic valve", "mitral valve",
           "coronary vessels", "aorta", "pulmonary artery", "spine", "thoracic vertebrae", "cervical vertebrae",
           "neck"}
DEFAULT_ZONE = {"effusion": "lower", "atelectasis": "lower", "device": "upper", "pneumothorax": "upper"}


@dataclass(frozen=True)
class Finding:
    """One thing to draw, with the MeSH term it came from (the grounding phrase)."""

    kind: str
    side: str  # patient's side: right | left | bilateral
    zone: str  # upper | middle | lower | diffuse
    severity: float
    term: str


def _kind(head: str, attrs: list[str]) -> str | None:
    if head in HEAD_KIND and not (HEAD_KIND[head] == "device" and "abdomen" in attrs):
        return HEAD_KIND[head]  # (surgical clips in the abdomen lie outside the rendered chest)
    if head == "Lung" and "hyperdistention" in attrs:
        return "emphysema"
    if head == "Costophrenic Angle" and "blunted" in attrs:
        return "effusion"
    if head == "Calcinosis" and "lung" in attrs:
        return "granuloma"
    if head in ("Cardiac Shadow", "Heart") and "enlarged" in attrs:
        return "cardiomegaly"
    return None


def parse_term(term: str, rng: np.random.Generator) -> list[Finding]:
    """Findings drawn for one MeSH term ([] if it has no drawable counterpart). Where the report
    leaves the side or zone open, `rng` picks one, so the image stays consistent with the text."""
    head, *attrs = [p.strip() for p in term.split("/")]
    kind = _kind(head, attrs)
    if kind is None:
        return []
    if kind in BILATERAL_KINDS or "bilateral" in attrs or (kind == "device" and MIDLINE & set(attrs)):
        side = "bilateral"
    elif "right" in attrs:
        side = "right"
    elif "left" in attrs or "lingula" in attrs:
        side = "left"
    else:
        side = str(rng.choice(["right", "left"]))
    zone = next((ZONES[a] for a in attrs if a in ZONES), None)
    if zone is None:
        zone = DEFAULT_ZONE.get(kind) or str(rng.choice(["upper", "middle", "lower"]))
    if kind in BILATERAL_KINDS:
        zone = "diffuse" if kind != "cardiomegaly" else "lower"
    severity = next((SEVERITY[a] for a in attrs if a in SEVERITY), 0.5)
    if head == "Costophrenic Angle":
        severity = min(severity, 0.25)
    copies = 1
    if kind in ("nodule", "granuloma") and ("multiple" in attrs or "scattered" in attrs):
        copies = int(rng.integers(2, 4))
    out = []
    for i in range(copies):
        z = zone if zone != "diffuse" or kind in BILATERAL_KINDS else str(rng.choice(["upper", "middle", "lower"]))
        s = side if side != "bilateral" or kind in BILATERAL_KINDS or copies == 1 else ("right", "left")[i % 2]
        out.append(Finding(kind, s, z, severity, term))
    return out


def findings_for(mesh: tuple[str, ...], rng: np.random.Generator) -> tuple[list[Finding], Counter]:
    """(findings to draw, Counter of MeSH heads not drawn). The same kind twice in one report
    (e.g. `Cardiomegaly` and `Cardiac Shadow/enlarged`) is drawn once for the global kinds."""
    findings: list[Finding] = []
    not_drawn: Counter = Counter()
    for term in mesh:
        if term.lower() in ("normal", "no indexing"):
            continue
        got = parse_term(term, rng)
        if not got:
            not_drawn[term.split("/")[0].strip()] += 1
        for f in got:
            if f.kind in BILATERAL_KINDS and any(g.kind == f.kind for g in findings):
                not_drawn[f"{f.kind} (already drawn for another term)"] += 1
                continue
            findings.append(f)
    return findings, not_drawn


def labels_for(kinds: list[str] | set[str]) -> dict[str, int]:
    """Label columns (1 / 0) from the kinds actually drawn, so labels describe the image; an
    image with any drawn finding (a scar too) is not normal."""
    kinds = set(kinds)
    labels = {col: int(any(k in kinds for k in ks)) for col, ks in LABELS.items()}
    return {"normal": int(not kinds), **labels}
