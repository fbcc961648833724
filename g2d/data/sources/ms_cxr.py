"""MS-CXR phrase grounding (Boecking et al., ECCV 2022): radiologists' boxes for report phrases on MIMIC-CXR images.

Official layout (PhysioNet `ms-cxr`, the folder passed as --src):

    MS_CXR_Local_Alignment_v1.0.0.csv   (v1.1.0 in the later release; the newest one present is used)
        dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height
        (v1.1.0 adds `split`; a `subject_id` column is used when present)

The images are not part of MS-CXR: `path` ("files/p15/p15XXXXXX/sSTUDY/DICOM_ID.jpg") is relative to the
MIMIC-CXR-JPG 2.0.0 folder, given as --images (importing.Options.images), else --src; a folder that is
`files/` itself also works. The release's COCO-style JSON holds the same annotations and is not read.

Quirks handled here:
- one row per box: a phrase with several boxes (e.g. bilateral effusions) has several rows, an image with
  several phrases has rows for each; all rows of a dicom_id become one image with one `findings` entry per
  box ({"phrase": label_text, "kind": category, "box": [x0, y0, x1, y1]}) and the same boxes in `boxes`;
- boxes are x, y, w, h in the original image's pixels (image_width x image_height, the size of the
  MIMIC-CXR-JPG file); a box outside that image is an error naming the row;
- a resized copy of MIMIC-CXR-JPG (the 1024-px or 512-px copies many groups keep) would put the boxes off
  the image. The scan reads each JPG's size from its header (about 1,000 images, no decoding): when it
  differs from image_width x image_height by a common scale (aspect ratio within 1%), the boxes are rescaled
  to the file's pixels, which is what the stored copy is then resized from; any other mismatch is an error
  (the file is not the annotated image);
- the category becomes the finding's `kind` in g2d's label names ("Pleural Effusion" -> effusion,
  "Lung Opacity" -> lung_opacity), so grounding results line up with the classification tasks;
- v1.1.0's `split` column is not used: the protocol (ms-cxr-patient) draws val / test by patient from all
  images (pool "all").
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from g2d.data import importing
from g2d.data.sources import chexpert_labels
from g2d.errors import DataError

COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height")
_FILE = re.compile(r"MS_CXR_Local_Alignment_v(\d+)\.(\d+)\.(\d+)\.csv")
_PATH = re.compile(r"(?:^|/)p(\d+)/s(\d+)/([^/]+)\.jpg$")
_ASPECT = 0.01  # relative aspect-ratio difference still taken as the same image, resized


def annotation_file(src: Path) -> Path:
    """The newest MS_CXR_Local_Alignment_vX.Y.Z.csv in src."""
    found = sorted((tuple(int(v) for v in m.groups()), p) for p in src.glob("MS_CXR_Local_Alignment_v*.csv")
                   if (m := _FILE.fullmatch(p.name)))
    if not found:
        raise DataError(f"{src}: no MS_CXR_Local_Alignment_v1.0.0.csv (or v1.1.0); is --src the MS-CXR folder from "
                        "PhysioNet?")
    return found[-1][1]


def kind(category: str) -> str:
    """A category as g2d names the finding: CheXpert's observations by their label column, others snake case."""
    category = " ".join(category.split())
    if category in chexpert_labels.COLUMNS:
        return chexpert_labels.COLUMNS[category]
    return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")


def _numbers(row: dict, where: str) -> tuple[float, ...]:
    try:
        values = tuple(float(row[c]) for c in ("x", "y", "w", "h", "image_width", "image_height"))
    except ValueError:
        raise DataError(f"{where}: x, y, w, h, image_width, image_height must be numbers, got "
                        f"{[row[c] for c in ('x', 'y', 'w', 'h', 'image_width', 'image_height')]}") from None
    x, y, w, h, width, height = values
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise DataError(f"{where}: x, y, w, h, image_width, image_height must be finite numbers, got {values}")
    if w <= 0 or h <= 0 or width <= 0 or height <= 0:
        raise DataError(f"{where}: box w x h = {w:g} x {h:g} on an image of {width:g} x {height:g}; all must be "
                        "positive")
    slack = importing.BOX_SLACK  # what the engine allows an annotation to overhang
    if x < -slack or y < -slack or x + w > width + slack or y + h > height + slack:
        raise DataError(f"{where}: box x, y, w, h = {x:g}, {y:g}, {w:g}, {h:g} lies outside the image "
                        f"(image_width x image_height = {width:g} x {height:g}); fix the row or remove it")
    return values


def _image(root: Path, rel: str) -> Path:
    """The JPG a `path` cell names: under the MIMIC-CXR-JPG folder, or under its files/ folder itself."""
    path = root / rel
    if not path.is_file() and rel.startswith("files/") and (root / rel[len("files/"):]).is_file():
        return root / rel[len("files/"):]
    return path


def _file_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header; None when it cannot be read (the worker reports why)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _scale(listed: tuple[float, float], actual: tuple[int, int] | None, path: Path, where: str):
    """(sx, sy) from the annotated image's pixels to the file's."""
    if actual is None or actual == listed:
        return 1.0, 1.0
    (width, height), (w, h) = listed, actual
    if abs((w / h) / (width / height) - 1) > _ASPECT:
        raise DataError(f"{where}: image_width x image_height is {width:g} x {height:g} but {path} is {w} x {h}, "
                        "not a resized copy of it; is --images the MIMIC-CXR-JPG 2.0.0 folder?")
    return w / width, h / height


def scan(src: Path, options: importing.Options) -> importing.Scan:
    csv_path = annotation_file(src)
    table = importing.read_table(csv_path, COLUMNS)
    root = Path(options.images) if options.images else src
    has_subject = "subject_id" in table.columns
    rows: dict[str, list[int]] = {}
    for i, dicom in enumerate(table["dicom_id"].str.strip().tolist()):
        if not importing.SAFE_ID.fullmatch(dicom):
            raise DataError(f"{importing.row_where(csv_path, i)}: dicom_id is {dicom!r}; MS-CXR's are MIMIC-CXR "
                            "dicom_ids such as 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014")
        rows.setdefault(dicom, []).append(i)

    items = []
    for dicom, idx in rows.items():
        first = table.loc[idx[0]]
        where = importing.row_where(csv_path, idx[0]) + (f" (+{len(idx) - 1} more rows)" if len(idx) > 1 else "")
        rel = first["path"].strip().replace("\\", "/")
        m = _PATH.search(rel)
        if not m or m[3] != dicom:
            raise DataError(f"{importing.row_where(csv_path, idx[0])}: path {rel!r} is not MIMIC-CXR-JPG's "
                            f"files/pXX/pSUBJECT/sSTUDY/{dicom}.jpg")
        subject, study = m[1], m[2]
        if has_subject and first["subject_id"].strip():
            subject = first["subject_id"].strip()
        listed, boxes = None, []
        for i in idx:  # every row is checked, also those of an image that turns out to be missing
            row = table.loc[i]
            row_where = importing.row_where(csv_path, i)
            if row["path"].strip().replace("\\", "/") != rel:
                raise DataError(f"{row_where}: dicom_id {dicom} has path {row['path']!r} here but {rel!r} at "
                                f"{importing.row_where(csv_path, idx[0])}; one image has one path")
            x, y, w, h, width, height = _numbers(row, row_where)
            if listed is None:
                listed = (width, height)
            elif (width, height) != listed:
                raise DataError(f"{row_where}: image_width x image_height is {width:g} x {height:g} here but "
                                f"{listed[0]:g} x {listed[1]:g} at {importing.row_where(csv_path, idx[0])}; "
                                "one image has one size")
            phrase = " ".join(row["label_text"].split())
            if not phrase:
                raise DataError(f"{row_where}: label_text is empty; every MS-CXR box belongs to a phrase")
            boxes.append((x, y, x + w, y + h, phrase, kind(row["category_name"]) or "finding"))
        image = _image(root, rel)
        item = importing.Item(id=dicom, image=image, patient_id=subject, pool="all", where=where, study_id=study,
                              source_id=dicom)
        items.append(item)
        if not image.is_file():
            item.missing = importing.missing_file(image, where, "MIMIC-CXR-JPG image of this dicom_id")
            continue
        sx, sy = _scale(listed, _file_size(image), image, where)
        for x0, y0, x1, y1, phrase, name in boxes:
            box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
            item.findings.append({"phrase": phrase, "kind": name, "box": box})
            item.boxes.append((*box, name))
    return importing.Scan(items)


IMPORTER = importing.Importer(
    name="ms-cxr", default_protocol="ms-cxr-patient", labels=(), columns=("study_id", "boxes", "findings"),
    scan=scan,
    layout="MS_CXR_Local_Alignment_v1.0.0.csv (or v1.1.0), with the MIMIC-CXR-JPG 2.0.0 folder holding its "
           "files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg under --src or --images")
