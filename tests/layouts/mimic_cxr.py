"""MIMIC-CXR-JPG 2.0.0 with MIMIC-CXR's reports, as PhysioNet distributes them: the three tables (metadata and
CheXpert labels gzipped, the split file unpacked, both forms occur), files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg, and
the reports files/pXX/pSUBJECT/sSTUDY.txt in MIMIC's own format (every line starts with a space, paragraphs are
separated by " " lines, a wet read may precede the "FINAL REPORT" line)."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from g2d.data.sources.chexpert_labels import COLUMNS
from tests.layouts import radiograph, write_picture

FINAL = "                                 FINAL REPORT"
RULE = " " + "_" * 78

# the FINAL REPORT line, wrapped lines, a wet read above it (not part of the report)
FULL_REPORT = f""" WET READ: ___ ___ ___ 3:05 PM
  Subtle left basilar opacity, likely atelectasis.
{RULE}
{FINAL}
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with new onset ascites  // eval for infection
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  None.
 
 FINDINGS: 
 
 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.  Minimal left
 basilar atelectasis.
 
 The cardiomediastinal silhouette is normal.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.  Possible minimal left basilar
 atelectasis.
"""
FULL_FINDINGS = ("There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that "
                 "most likely represent nipple shadows. Minimal left basilar atelectasis. The cardiomediastinal "
                 "silhouette is normal.")
FULL_IMPRESSION = "No acute cardiopulmonary process. Possible minimal left basilar atelectasis."

IMPRESSION_ONLY = f"""{FINAL}
 PORTABLE CHEST OF ___
 
 COMPARISON:  ___ radiograph.
 
 IMPRESSION:  Interval placement of a right internal jugular central venous
 catheter, terminating in the mid SVC.  No pneumothorax.
"""
IMPRESSION_ONLY_TEXT = ("IMPRESSION: Interval placement of a right internal jugular central venous catheter, "
                        "terminating in the mid SVC. No pneumothorax.")

# no findings or impression header: the last paragraph stands in for the impression
LAST_PARAGRAPH = f"""{FINAL}
 HISTORY:  Shortness of breath.
 
 COMPARISON:  Chest radiograph from ___.
 
 Frontal and lateral views of the chest were obtained.  The lungs are
 hyperinflated but clear.  Heart size is normal.
"""
LAST_PARAGRAPH_TEXT = ("IMPRESSION: Frontal and lateral views of the chest were obtained. The lungs are hyperinflated "
                       "but clear. Heart size is normal.")

# capital headers only: "CHEST, TWO VIEWS" reads as findings; sub-headings stay in the findings
CAPITALS = f"""{FINAL}
 INDICATION:  Intubated patient, assess tube position.
 
 CHEST, TWO VIEWS:
 LINES/TUBES:  The endotracheal tube terminates 4 cm above the
 carina.
 LUNGS:  Low lung volumes.  No consolidation.
 
 NOTIFICATION:  Findings discussed with Dr. ___ at 10:00 on ___.
"""
CAPITALS_TEXT = ("FINDINGS: LINES/TUBES: The endotracheal tube terminates 4 cm above the carina. LUNGS: Low lung "
                 "volumes. No consolidation.")

# header-led sections only: nothing to pair with the image
NO_SECTIONS = f"""{FINAL}
 INDICATION:  ___M with chest pain.
 
 COMPARISON:
 
 None.
"""


@dataclass
class Image:
    dicom_id: str
    view: str
    written: bool = True  # False: listed in the tables, JPG missing


@dataclass
class Study:
    subject: str
    study: str
    split: str
    images: list[Image]
    report: str | None  # None: no report file
    labels: dict[str, str] | None = field(default=None)  # CheXpert header -> cell; None: no labels row


def dicom_id(n: int) -> str:
    """An id shaped like MIMIC's (five dash-separated groups of eight hex digits)."""
    h = hashlib.sha1(str(n).encode()).hexdigest()[:40]
    return "-".join(h[k:k + 8] for k in range(0, 40, 8))


def studies() -> list[Study]:
    """Seven studies of five patients over the three official splits."""
    d = iter(dicom_id(n) for n in range(100))
    return [
        Study("10000032", "50414267", "train", [Image(next(d), "PA"), Image(next(d), "LATERAL")], FULL_REPORT,
              {"Atelectasis": "-1.0", "Lung Opacity": "1.0", "No Finding": "", "Pleural Effusion": "0.0"}),
        Study("10000032", "53189527", "train", [Image(next(d), "AP")], IMPRESSION_ONLY,
              {"Support Devices": "1.0", "Pneumothorax": "0.0"}),
        Study("10000764", "57375967", "train", [Image(next(d), "PA"), Image(next(d), "LL")], LAST_PARAGRAPH, None),
        Study("11000183", "51967283", "validate", [Image(next(d), "AP"), Image(next(d), "PA"), Image(next(d), "")],
              FULL_REPORT, {"No Finding": "1.0"}),
        Study("12000560", "55106413", "test", [Image(next(d), "PA")], None, {"Edema": "1.0"}),
        Study("12000560", "59398463", "test", [Image(next(d), "AP"), Image(next(d), "AP", written=False)], CAPITALS,
              {"Edema": "-1.0", "Cardiomegaly": "1.0"}),
        Study("10000898", "50771383", "train", [Image(next(d), "PA")], NO_SECTIONS, {"No Finding": "1.0"}),
    ]


def _write_csv(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def build(root: Path, reports: Path | None = None, size: int = 48) -> list[Study]:
    """The dataset under `root`; the reports under `reports` (a folder holding files/) or beside the JPGs."""
    all_studies = studies()
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
            "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
            "PatientOrientationCodeSequence_CodeMeaning"]
    split = ["dicom_id,study_id,subject_id,split"]
    chexpert = ["subject_id,study_id," + ",".join(sorted(COLUMNS))]
    seed = 0
    for s in all_studies:
        folder = root / "files" / f"p{s.subject[:2]}" / f"p{s.subject}" / f"s{s.study}"
        for im in s.images:
            view_name = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                         "LL": "left lateral"}.get(im.view, "")
            meta.append(f"{im.dicom_id},{s.subject},{s.study},CHEST (PA AND LAT),{im.view},{size},{size - 8},"
                        f"21800506,213014.531,CHEST (PA AND LAT),{view_name},Erect")
            split.append(f"{im.dicom_id},{s.study},{s.subject},{s.split}")
            if im.written:
                write_picture(folder / f"{im.dicom_id}.jpg", radiograph(size, size - 8, seed=seed))
            seed += 1
        if s.report is not None:
            path = (reports or root) / "files" / f"p{s.subject[:2]}" / f"p{s.subject}" / f"s{s.study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(s.report)
        if s.labels is not None:
            chexpert.append(f"{s.subject},{s.study}," + ",".join(s.labels.get(c, "") for c in sorted(COLUMNS)))
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", split)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert)
    return all_studies
