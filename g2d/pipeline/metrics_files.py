"""Small JSON metrics files that DVC tracks (`metrics/...`): JSON has no NaN, so undefined values
(an AUC with one outcome) are written as null."""

from __future__ import annotations

import json
import math
from pathlib import Path


def finite(obj):
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write(path: Path, metrics: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(metrics), indent=2, allow_nan=False) + "\n")
    return path


def numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a flat dict, as MLflow metrics."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
