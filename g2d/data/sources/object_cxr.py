"""Object-CXR foreign objects (JF Healthcare's MIDL 2020 challenge, github.com/jfhealthcare/object-CXR) as
distributed.

Layout of --src:
  train.csv, dev.csv            columns image_name, annotation
  train/#####.jpg, dev/#####.jpg  the images (JPG, sizes vary from image to image)

The annotation cell is empty for an image without foreign objects (half the images); otherwise objects
separated by ';', each "TYPE x1 y1 x2 y2 ..." in the image's pixels (origin top left):
  0  rectangle, its upper-left and lower-right corners
  1  ellipse, the corners of its bounding box
  2  polygon, its vertices x1 y1 ... xn yn
Each object becomes a box [x0, y0, x1, y1, "foreign_object"] (its bounding box) and a shape drawn into
the mask (mask = "shapes"); the label column foreign_object is 1 when the image has any. Quirks handled:
image_name is the bare file name in train.csv / dev.csv, but the README's example shows a path, so only
its last part is used; a trailing ';' or doubled spaces are tolerated. The dataset has no patient ids, so
each image is its own patient. train and dev images are told apart by their pool in the id
("train-00001"), the file name stays in source_id.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from g2d.data import importing
from g2d.errors import DataError

POOLS = ("train", "dev")
COLUMNS = ("image_name", "annotation")
LABEL = "foreign_object"
KINDS = {"0": "rectangle", "1": "ellipse", "2": "polygon"}


def parse_annotation(text: str, where: str) -> list[tuple[str, tuple[float, ...]]]:
    """An annotation cell -> [(kind, (x, y, ...))]; rectangles and ellipses as (x0, y0, x1, y1), sorted."""
    shapes = []
    for k, part in enumerate(p for p in text.split(";") if p.strip()):
        fields = part.split()
        what = f"{where}: object {k + 1} ({part.strip()[:60]!r})"
        kind = KINDS.get(fields[0])
        if kind is None:
            raise DataError(f"{what}: unknown type {fields[0]!r}; Object-CXR types are 0 (rectangle), 1 (ellipse) "
                            "and 2 (polygon)")
        try:
            xy = tuple(float(v) for v in fields[1:])
        except ValueError:
            raise DataError(f"{what}: coordinates are not numbers") from None
        if len(xy) % 2:
            raise DataError(f"{what}: odd number of coordinates ({len(xy)}); they are x y pairs")
        if kind == "polygon":
            if len(xy) < 6:
                raise DataError(f"{what}: a polygon needs at least 3 points, got {len(xy) // 2}")
        elif len(xy) != 4:
            raise DataError(f"{what}: a {kind} is 'x1 y1 x2 y2' (two corners), got {len(xy)} coordinates")
        else:
            x0, y0, x1, y1 = xy
            xy = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        shapes.append((kind, xy))
    return shapes


def bounding_box(xy: tuple[float, ...]) -> tuple[float, float, float, float]:
    return min(xy[0::2]), min(xy[1::2]), max(xy[0::2]), max(xy[1::2])


def _file_name(image_name: str) -> str:
    """The file's name, whether the cell holds a bare name or a (POSIX or Windows) path."""
    return PureWindowsPath(PurePosixPath(image_name.strip()).name).name


def scan(src: Path, options: importing.Options) -> importing.Scan:
    items = []
    for pool in POOLS:
        csv_path = src / f"{pool}.csv"
        table = importing.read_table(csv_path, COLUMNS)
        seen: dict[str, str] = {}
        for i, (image_name, annotation) in enumerate(zip(table["image_name"], table["annotation"], strict=True)):
            where = importing.row_where(csv_path, i)
            name = _file_name(image_name)
            if not name:
                raise DataError(f"{where}: image_name is empty")
            if name in seen:
                raise DataError(f"{where}: {name} is listed twice (also at {seen[name]}); remove the duplicate row")
            seen[name] = where
            shapes = parse_annotation(annotation, where)
            image = src / pool / name
            item_id = f"{pool}-{importing.safe_id(PurePosixPath(name).stem)}"
            items.append(importing.Item(
                id=item_id, image=image, patient_id=item_id, pool=pool, where=where, source_id=name,
                labels={LABEL: int(bool(shapes))}, mask="shapes", shapes=shapes,
                boxes=[(*bounding_box(xy), LABEL) for _, xy in shapes],
                missing=None if image.is_file() else importing.missing_file(image, where)))
    return importing.Scan(items)


IMPORTER = importing.Importer(
    name="object-cxr", default_protocol="object-cxr-g2d", labels=(LABEL,), columns=("mask", "boxes"), scan=scan,
    layout="train.csv and dev.csv (image_name, annotation) and the images in train/ and dev/")
