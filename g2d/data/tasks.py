"""The downstream tasks of the paper's tables, and which dataset each reads.

Tasks are named after the real dataset of the paper (Table 1: SIIM / RSNA segmentation and RSNA /
Object-CXR detection; Table 4: CheXpert / RSNA / COVIDx classification). Where SynthCXR has an
equivalent it is the default; `finetune.datasets.<task>` points a task at an imported dataset instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from g2d.config import TASK_NAMES, Params, resolve_path
from g2d.errors import ConfigError

Kind = Literal["segmentation", "classification", "detection"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    labels: tuple[str, ...]  # classification: label columns; detection: box labels; segmentation: the finding
    synthcxr: str | None  # the SynthCXR set used by default, None = needs an imported dataset
    paper: str  # what the paper evaluates
    multiclass: bool = False  # one label per image (accuracy) instead of several (macro AUC)

    @property
    def metric(self) -> str:
        """The headline metric: Dice per image, mAP over IoU 0.4:0.05:0.75, macro AUC or accuracy."""
        if self.kind == "segmentation":
            return "dice"
        if self.kind == "detection":
            return "map"
        return "accuracy" if self.multiclass else "auc"


CHEXPERT_5 = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion")

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("siim-seg", "segmentation", ("pneumothorax",), "pneumothorax", "SIIM-ACR pneumothorax, Dice"),
    TaskSpec("rsna-seg", "segmentation", ("opacity",), "opacity", "RSNA pneumonia (boxes as masks), Dice"),
    TaskSpec("chexpert-cls", "classification", CHEXPERT_5, "pretrain",
             "CheXpert, the 5 competition labels, macro AUC"),
    TaskSpec("rsna-cls", "classification", ("opacity",), "opacity", "RSNA pneumonia vs normal, AUC"),
    TaskSpec("covidx-cls", "classification", ("normal", "pneumonia", "covid"), None, "COVIDx, 3 classes, accuracy",
             multiclass=True),
    TaskSpec("rsna-det", "detection", ("opacity",), "opacity", "RSNA pneumonia boxes, mAP@[0.4:0.75]"),
    TaskSpec("object-cxr-det", "detection", ("foreign_object",), None, "Object-CXR foreign objects, mAP@[0.4:0.75]"),
)}
assert tuple(TASKS) == TASK_NAMES, "config.TASK_NAMES and data.tasks.TASKS must list the same tasks"


def get(name: str) -> TaskSpec:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown task {name!r}: {hint}tasks are {', '.join(TASKS)}")
    return TASKS[name]


def dataset_folder(spec: TaskSpec, params: Params, root: Path) -> Path:
    """The dataset a task reads: `finetune.datasets.<task>` if set, else its SynthCXR set."""
    return configured_folder(params.finetune.datasets.get(spec.name), spec.synthcxr, f"finetune.datasets.{spec.name}",
                             f"task {spec.name!r} ({spec.paper})", params, root)


def configured_folder(configured: str | None, synthcxr: str | None, key: str, what: str, params: Params,
                      root: Path) -> Path:
    """A dataset folder from its params key, else the named SynthCXR set; an error saying which key to set
    when there is no SynthCXR equivalent (shared by the fine-tuning, zero-shot and grounding tasks)."""
    if configured:
        return resolve_path(root, configured)
    if synthcxr is None:
        raise ConfigError(f"{what} has no SynthCXR equivalent; import the dataset (g2d data import) and set {key} "
                          f"to its folder (--set {key}=DIR)")
    return resolve_path(root, params.paths.synthcxr) / synthcxr
