"""MIMIC-CXR-JPG 2.0.0 images and labels, paired with the free-text reports of MIMIC-CXR 2.0.0.

Official layout (PhysioNet `mimic-cxr-jpg/2.0.0/`, the folder passed as --src):

    files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg      XX = the first two digits of SUBJECT
    mimic-cxr-2.0.0-metadata.csv.gz             dicom_id, subject_id, study_id, ..., ViewPosition, ...
    mimic-cxr-2.0.0-split.csv.gz                dicom_id, study_id, subject_id, split (train / validate / test)
    mimic-cxr-2.0.0-chexpert.csv.gz             subject_id, study_id, 14 CheXpert columns (one row per study)

The tables are accepted gzipped (as distributed) or unpacked (.csv). The reports come from MIMIC-CXR
itself (`mimic-cxr-reports.zip`), one text file per study, `files/pXX/pSUBJECT/sSTUDY.txt`; depending on
how the zip was unpacked that tree sits under `mimic-cxr-reports/` or directly beside the JPGs' `files/`.
The reports folder is `--reports` (importing.Options.reports), else --src; `files/`,
`mimic-cxr-reports/files/` and the folder itself are tried, and the one holding the reports is used.

Quirks handled here:
- the metadata lists every view; only frontal images (ViewPosition PA or AP) are kept, the others
  (LATERAL, LL, AP AXIAL, blank, ...) are counted as dropped per ViewPosition;
- labels are per study, keyed by (subject_id, study_id); a study without a row in the CheXpert table
  gets blank labels; cells are 1.0 / 0.0 / -1.0 / blank, kept raw (-1 = uncertain: the engine applies
  the `uncertain` policy);
- reports are free text with capitalised headers ("FINDINGS:", "IMPRESSION:", ...), often preceded by
  a "WET READ" and always by a "FINAL REPORT" line; `read_report` sections them (see `section_report`)
  in the import's workers, so no report text is ever held for the 227k studies at once. A study whose
  report has neither findings nor an impression is dropped and counted (by the engine).

Each kept image is one row: id = dicom_id, patient_id = subject_id, study_id, pool = the official split.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from g2d.data import importing
from g2d.data.sources import chexpert_labels
from g2d.errors import DataError

PREFIX = "mimic-cxr-2.0.0"
METADATA, SPLIT, CHEXPERT = f"{PREFIX}-metadata", f"{PREFIX}-split", f"{PREFIX}-chexpert"
FRONTAL = ("PA", "AP")
POOLS = ("train", "validate", "test")
_PROBE = 50  # studies probed to find where the reports are


# ---------------------------------------------------------------- report sectioning
# Modelled on MIMIC-CXR's official txt/section_parser.py (MIT-LCP/mimic-cxr), with these decisions:
# - only the text after the "FINAL REPORT" line counts (a WET READ above it is the preliminary read);
# - a header is a line starting with capitals and a colon; its name is normalised (typos and synonyms:
#   "IMPRESSON", "CONCLUSION" -> impression; "PA AND LATERAL VIEWS OF THE CHEST" -> findings);
# - inside findings / impression an unknown capitalised header ("LUNGS:", "LINES/TUBES:") is a
#   sub-heading and stays in the section with its text, where the official parser would end the section;
# - when neither findings nor impression exists, the official parser takes the last section's text after
#   its first paragraph. Here the stand-in for the impression is the last run of *loose* paragraphs: text
#   no header owns. A header other than findings / impression (INDICATION, HISTORY, COMPARISON, ...) owns
#   only its first paragraph, so "COMPARISON:  None." at the end never becomes an impression, and the
#   report's first paragraph (a title such as "CHEST RADIOGRAPH" or the only paragraph) never does either.

_HEADER = re.compile(r"^\s*([A-Z][A-Z ()/,&-]*[A-Z)])\s*:(?=\s|$)(.*)$")
_RULE = re.compile(r"^\s*_{8,}\s*$")  # the line of underscores between a wet read and the final report
_SYNONYMS = {
    "impression": ("impression", "impressions", "conclusion", "conclusions", "findings and impression",
                   "findings/impression", "findings/ impression", "impression and findings", "impresson",
                   "imprression", "imoression", "impressoin", "imprssion", "impresion", "imperssion", "mpression",
                   "impession", "concusion", "coinclusion"),
    "findings": ("findings", "finding", "findins", "findindgs", "findgings", "findngs", "findnings", "finidngs",
                 "reference findings"),
    "comparison": ("comparison", "comparisons", "comparison exam", "comparison film", "comparison study",
                   "reference exam", "comparision", "comparsion", "comparrison", "comparisions"),
    "indication": ("indication", "indications", "reason for examination", "reason for exam", "clinical indication",
                   "idication"),
    "history": ("history", "clinical history", "clinical information", "patient history"),
    "examination": ("examination", "exam", "type of examination", "study"),
    "technique": ("technique",),
    "notification": ("notification", "notifications"),
    "recommendations": ("recommendation", "recommendations", "recommendation(s)"),
    "addendum": ("addendum",),
    "wet read": ("wet read", "wetread"),
    "pfi": ("pfi", "provisional findings impression (pfi)", "provisional findings impression"),
    "date": ("date",),
    "comment": ("comment", "comments"),
}
_NAMES = {alias: name for name, aliases in _SYNONYMS.items() for alias in aliases}
# words in the order the official parser tries them: "findings and impression" is an impression
_CONTAINS = ("impression", "conclusion", "finding", "history", "comparison", "addendum")
_VIEW = re.compile(r"chest|portable|pa and lat|ap and lat|lateral and (pa|ap)|frontal|two views|one view|single view|"
                   r"(pa|ap|lateral) view|upright|supine|ribs|bone window")
MAIN = ("findings", "impression")


def section_name(header: str) -> str | None:
    """A header's normalised section name, or None when it is not a known kind of section."""
    name = re.sub(r"\s+", " ", header.strip().lower())
    if name in _NAMES:
        return _NAMES[name]
    for word in _CONTAINS:
        if word in name:
            return {"conclusion": "impression", "finding": "findings"}.get(word, word)
    if _VIEW.search(name):
        return "findings"  # a header naming the views describes the whole study, like findings
    return None


@dataclass
class _Section:
    name: str | None  # None: text before any header
    paragraphs: list[list[str]] = field(default_factory=lambda: [[]])


@dataclass(frozen=True)
class Sections:
    findings: str
    impression: str
    stand_in: bool  # the impression is the report's last loose paragraph(s)

    @property
    def text(self) -> str:
        """'FINDINGS: ... IMPRESSION: ...' (a missing part left out), as IU X-ray's reports read."""
        parts = [f"FINDINGS: {self.findings}" if self.findings else "",
                 f"IMPRESSION: {self.impression}" if self.impression else ""]
        return " ".join(p for p in parts if p)


def _clean(lines: list[str]) -> str:
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def section_report(text: str) -> Sections:
    """Findings and impression of a MIMIC-CXR report (wrapped lines joined, whitespace normalised)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for k, line in enumerate(lines):
        if line.strip().upper() == "FINAL REPORT":
            lines = lines[k + 1:]
            break
    sections = [_Section(None)]
    for line in lines:
        current = sections[-1]
        if not line.strip() or _RULE.match(line):
            if current.paragraphs[-1]:
                current.paragraphs.append([])
            continue
        m = _HEADER.match(line)
        name = section_name(m[1]) if m else None
        if m and name is None and current.name in MAIN:
            name = current.name  # a sub-heading of findings / impression: kept with its text
        elif m:
            sections.append(_Section(name or re.sub(r"\s+", " ", m[1].strip().lower())))
            if m[2].strip():
                sections[-1].paragraphs[-1].append(m[2])
            continue
        current.paragraphs[-1].append(line)

    found = {n: " ".join(t for s in sections if s.name == n for p in s.paragraphs if (t := _clean(p)))
             for n in MAIN}
    if found["findings"] or found["impression"]:
        return Sections(found["findings"], found["impression"], stand_in=False)
    # loose paragraphs: the text before any header, and what follows another header's own (first) paragraph;
    # the body's first paragraph is never one (a title, or the whole report)
    paragraphs: list[tuple[bool, str]] = []
    for s in sections:
        own = [t for p in s.paragraphs if (t := _clean(p))]
        for k, t in enumerate(own):
            paragraphs.append((s.name is None or k > 0, t))
    loose = [(k, t) for k, (free, t) in enumerate(paragraphs) if free and k > 0]
    if not loose:
        return Sections("", "", stand_in=False)
    run = [loose[-1]]
    for k, t in reversed(loose[:-1]):
        if k != run[-1][0] - 1:
            break
        run.append((k, t))
    return Sections("", " ".join(t for _, t in reversed(run)), stand_in=True)


def read_report(path: Path) -> str | None:
    """The worker's view of one study's report: 'FINDINGS: ... IMPRESSION: ...', or None when it has
    neither (the engine drops the image and counts why)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"report {path} cannot be read ({e})") from None
    return section_report(text).text or None


# ---------------------------------------------------------------- import of the official download


def _table(src: Path, stem: str) -> Path:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (src / name).is_file():
            return src / name
    raise DataError(f"{src}: missing {stem}.csv.gz (or unpacked, {stem}.csv); MIMIC-CXR-JPG 2.0.0 ships it beside "
                    "files/: is --src the mimic-cxr-jpg/2.0.0 folder?")


def _report_path(root: Path, subject: str, study: str) -> Path:
    return root / f"p{subject[:2]}/p{subject}/s{study}.txt"


def _reports_root(base: Path, studies: list[tuple[str, str]]) -> Path:
    """The folder holding pXX/pSUBJECT/sSTUDY.txt: the candidate where most probed reports exist."""
    candidates = [base / "files", base / "mimic-cxr-reports" / "files", base]
    probe = studies[:: max(1, len(studies) // _PROBE)][:_PROBE]
    hits = [sum(_report_path(c, s, t).is_file() for s, t in probe) for c in candidates]
    if probe and not any(hits):
        s, t = probe[0]
        raise DataError(f"{base}: not one of {len(probe)} studies' reports exists (e.g. "
                        f"{_report_path(candidates[0], s, t)}); unpack MIMIC-CXR 2.0.0's mimic-cxr-reports.zip "
                        "(files/pXX/pSUBJECT/sSTUDY.txt) into --src or pass its folder with --reports")
    return candidates[hits.index(max(hits))] if probe else candidates[0]


def _check_ids(table, path: Path, columns: tuple[str, ...]) -> None:
    """subject_id / study_id are numbers and dicom_id a hex id: they become paths and file names."""
    for column in columns:
        pattern = importing.SAFE_ID.pattern if column == "dicom_id" else r"\d+"
        bad = table.index[~table[column].str.strip().str.fullmatch(pattern)]
        if len(bad):
            i = int(bad[0])
            kind = "a hex id such as 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014" if column == "dicom_id" \
                else "a number such as 10000032"
            raise DataError(f"{importing.row_where(path, i)}: {column} is {table.at[i, column]!r}; MIMIC-CXR's "
                            f"{column} is {kind}")


def read_labels(path: Path) -> dict[tuple[str, str], dict[str, int | None]]:
    """(subject_id, study_id) -> raw labels. Identical label sets share one dict: the 227k studies have
    only a few thousand distinct ones, so the 243k frontal items stay small."""
    table = importing.read_table(path, ("subject_id", "study_id", *chexpert_labels.COLUMNS))
    _check_ids(table, path, ("subject_id", "study_id"))
    columns = []
    for header in chexpert_labels.COLUMNS:
        cells = table[header]
        parse = {v: chexpert_labels.value(v, importing.row_where(path, int(i)), header)  # names the first bad row
                 for i, v in cells.drop_duplicates().items()}
        columns.append([parse[v] for v in cells.tolist()])
    names = chexpert_labels.LABELS
    shared: dict[tuple, dict[str, int | None]] = {}
    out = {}
    for subject, study, *values in zip(table["subject_id"].str.strip().tolist(),
                                       table["study_id"].str.strip().tolist(), *columns, strict=True):
        key = tuple(values)
        out[(subject, study)] = shared.setdefault(key, dict(zip(names, key, strict=True)))
    return out


def read_splits(path: Path) -> dict[str, str]:
    """dicom_id -> official split."""
    table = importing.read_table(path, ("dicom_id", "study_id", "subject_id", "split"))
    splits = table["split"].str.strip()
    bad = splits.index[~splits.isin(POOLS)]
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{importing.row_where(path, i)}: split is {table.at[i, 'split']!r}; MIMIC-CXR-JPG's split "
                        f"file holds {', '.join(POOLS)}" + (f" ({len(bad)} rows differ)" if len(bad) > 1 else ""))
    return dict(zip(table["dicom_id"].str.strip().tolist(), splits.tolist(), strict=True))


def scan(src: Path, options: importing.Options) -> importing.Scan:
    meta_path = _table(src, METADATA)
    meta = importing.read_table(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    _check_ids(meta, meta_path, ("dicom_id", "subject_id", "study_id"))
    split_path = _table(src, SPLIT)
    splits = read_splits(split_path)
    labels = read_labels(_table(src, CHEXPERT))

    dropped: Counter = Counter()
    frontal = []  # (row, dicom_id, subject, study)
    columns = (meta[c].str.strip().tolist() for c in ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    for i, (dicom, subject, study, view) in enumerate(zip(*columns, strict=True)):
        view = view.upper()
        if view not in FRONTAL:
            dropped[f"not a frontal view (ViewPosition {view or 'blank'}; PA and AP are kept)"] += 1
            continue
        frontal.append((i, dicom, subject, study))
    studies = list(dict.fromkeys((subject, study) for _, _, subject, study in frontal))
    reports = _reports_root(Path(options.reports) if options.reports else src, studies)
    report_of: dict[tuple[str, str], Path | None] = {}  # one Path per study, None when the file is missing
    files = src / "files"

    items = []
    for i, dicom, subject, study in frontal:
        where = importing.row_where(meta_path, i)
        pool = splits.get(dicom)
        if pool is None:
            raise DataError(f"{where}: dicom_id {dicom} has no row in {split_path}; the two files come from the "
                            "same MIMIC-CXR-JPG release: re-download the one that is out of date")
        key = (subject, study)
        if key not in report_of:
            path = _report_path(reports, subject, study)
            report_of[key] = path if path.is_file() else None
        report = report_of[key]
        image = files / f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"  # one join: 243k of them
        missing = None
        if report is None:
            missing = importing.missing_file(_report_path(reports, subject, study), where, "report of this study")
        elif not image.is_file():
            missing = importing.missing_file(image, where, "JPG of this dicom_id")
        items.append(importing.Item(id=dicom, image=image, patient_id=subject, pool=pool, where=where,
                                    study_id=study, labels=labels.get(key, {}), report_file=report, missing=missing))
    return importing.Scan(items, dropped)


IMPORTER = importing.Importer(
    name="mimic-cxr", default_protocol="mimic-cxr-official", labels=chexpert_labels.LABELS,
    columns=("study_id", "report"), scan=scan, read_report=read_report,
    layout=f"MIMIC-CXR-JPG 2.0.0: files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg, {METADATA}.csv.gz, {SPLIT}.csv.gz and "
           f"{CHEXPERT}.csv.gz; and MIMIC-CXR's reports files/pXX/pSUBJECT/sSTUDY.txt (under --src or --reports)")
