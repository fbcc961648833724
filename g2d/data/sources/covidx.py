"""COVIDx chest X-rays (COVID-Net, github.com/lindawangg/COVID-Net): the train / test lists as distributed.

Layout of --src (the Kaggle download, or the images built with COVID-Net's notebooks plus its list files):
  train.txt | train_COVIDx<version>.txt     one image a line, no header
  test.txt  | test_COVIDx<version>.txt
  train/<filename>, test/<filename>         the images (PNG / JPG)

A line is `patient_id filename class data_source`, space separated (filenames hold no spaces); the
oldest lists (train_split_v1.txt, ...) have no data_source column. Quirks handled here:
- the list files are named after the COVIDx version (train_COVIDx8A.txt, test_COVIDx_CXR-3A.txt, ...):
  any one train*.txt and one test*.txt is accepted, several candidates are an error that names them;
- the "A" lists (COVIDx v5 - v9A, CXR-3A) are 3-class: normal / pneumonia / COVID-19, the classes of the
  covidx-cls task (label columns normal / pneumonia / covid, exactly one 1 per image); v1's viral and
  bacteria classes are non-COVID pneumonia;
- the "B" lists and the Kaggle COVIDx CXR-2+ lists are binary, positive / negative: "negative" does not
  say normal or pneumonia, so they are refused with a message pointing at the 3-class list of the same
  images instead of being guessed at;
- patient ids come from each data source's own numbering (cohen's "3" and another source's "3" are
  different people), so with a data_source column the patient is "<data_source>:<patient_id>";
- COVIDx splits train / test by patient and a filename identifies an image across both lists: a
  patient or a filename in both lists means the two files do not belong together, an error;
- filenames repeat their stem with another extension (cohen's 000004.jpg and 000004.png are two
  images), so an image's id is its whole filename.
"""

from __future__ import annotations

from pathlib import Path

from g2d.data import importing
from g2d.errors import DataError

POOLS = ("train", "test")  # the official lists; each names its image folder
LABELS = ("normal", "pneumonia", "covid")
CLASSES = {  # class as written in the lists (lower-cased) -> label column
    "normal": "normal", "pneumonia": "pneumonia", "covid-19": "covid", "covid": "covid",
    "viral": "pneumonia", "bacteria": "pneumonia",  # COVIDx v1 split non-COVID pneumonia in two
}
BINARY = ("positive", "negative")
THREE_CLASS_LISTS = "train_COVIDx9A.txt / test_COVIDx9A.txt in the labels/ folder of github.com/lindawangg/COVID-Net"


def _where(path: Path, line: int) -> str:
    """A line of a headerless list file (line 1 = the first image)."""
    return f"{path} row {line}"


def list_file(src: Path, pool: str) -> Path:
    """The one `<pool>*.txt` in src (train.txt, train_COVIDx9A.txt, ...)."""
    found = sorted(p for p in src.glob(f"{pool}*.txt") if p.is_file())
    if not found:
        raise DataError(f"{src}: no {pool} list ({pool}.txt or {pool}_COVIDx<version>.txt); COVIDx's layout has "
                        f"{IMPORTER.layout}")
    if len(found) > 1:
        raise DataError(f"{src}: {len(found)} candidate {pool} lists ({', '.join(p.name for p in found)}); keep "
                        f"the one of the COVIDx version to import (a 3-class list, e.g. {pool}_COVIDx9A.txt) and "
                        "move the others away")
    return found[0]


def read_list(path: Path) -> list[tuple[int, str, str, str, str]]:
    """(line, patient_id, filename, label column, data_source) per image of a list file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the list ({e})") from None
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        where = _where(path, line)
        if len(fields) not in (3, 4):
            raise DataError(f"{where}: {len(fields)} fields ({raw.strip()[:80]!r}); a COVIDx list line is "
                            "'patient_id filename class [data_source]', separated by spaces")
        patient, filename, cls = fields[:3]
        key = cls.lower()
        if key in BINARY:
            raise DataError(f"{where}: class {cls!r}: {path.name} is a binary COVIDx list (COVID-19 positive / "
                            "negative), which cannot tell normal from pneumonia; the covidx-cls task needs the "
                            f"3-class list of the same images ({THREE_CLASS_LISTS}) in place of {path.name}")
        if key not in CLASSES:
            raise DataError(f"{where}: unknown class {cls!r}; COVIDx classes are normal, pneumonia and COVID-19")
        rows.append((line, patient, filename, CLASSES[key], fields[3] if len(fields) == 4 else ""))
    return rows


def scan(src: Path, options: importing.Options) -> importing.Scan:
    items = []
    first_patient: dict[str, tuple[str, str]] = {}  # patient -> (pool, where) of its first image
    first_file: dict[str, str] = {}  # filename -> where
    for pool in POOLS:
        path = list_file(src, pool)
        for line, patient, filename, label, data_source in read_list(path):
            where = _where(path, line)
            if filename in first_file:
                raise DataError(f"{where}: {filename} is listed twice (also at {first_file[filename]}); remove the "
                                "duplicate row")
            first_file[filename] = where
            patient_id = f"{data_source}:{patient}" if data_source else patient
            pool_before, where_before = first_patient.setdefault(patient_id, (pool, where))
            if pool_before != pool:
                raise DataError(f"{where}: patient {patient!r} ({data_source or 'no data source'}) is also in the "
                                f"{pool_before} list at {where_before}: patient in two splits; COVIDx splits by "
                                "patient, so the train and test lists are not of the same COVIDx version")
            image = src / pool / filename
            items.append(importing.Item(
                id=importing.safe_id(filename), image=image, patient_id=patient_id, pool=pool, where=where,
                source_id=filename, labels={c: int(c == label) for c in LABELS},
                missing=None if image.is_file() else importing.missing_file(image, where)))
    return importing.Scan(items)


IMPORTER = importing.Importer(
    name="covidx", default_protocol="covidx-g2d", labels=LABELS, columns=(), scan=scan,
    layout="train.txt and test.txt (or one train_COVIDx<version>.txt and test_COVIDx<version>.txt, 3-class: "
           "'patient_id filename class data_source' lines) and the images in train/ and test/")
