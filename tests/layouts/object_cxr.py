"""Object-CXR as distributed: train.csv / dev.csv (image_name, annotation; empty annotation = no object,
objects separated by ';', "TYPE x1 y1 x2 y2 ..." with 0 rectangle, 1 ellipse, 2 polygon) and JPGs of
varying sizes in train/ and dev/."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import radiograph, write_picture

WIDE, TALL = (64, 48), (40, 56)  # (width, height): two image sizes, as the real set varies
# (pool, image name, size, annotation)
ROWS = [
    ("train", "00001.jpg", WIDE, "0 8 6 40 30"),
    ("train", "00002.jpg", WIDE, "1 4 4 60 44"),
    ("train", "00003.jpg", TALL, "2 5 5 35 5 35 40 5 40;0 10 45 20 52"),
    ("train", "00004.jpg", TALL, ""),
    ("train", "00005.jpg", WIDE, ""),
    ("train", "00006.jpg", WIDE, "1 10 10 30 20;2 40 10 60 10 50 40"),
    ("train", "00007.jpg", TALL, ""),
    ("dev", "08001.jpg", WIDE, "0 30 20 50 40"),
    ("dev", "08002.jpg", TALL, ""),
    ("dev", "08003.jpg", TALL, "1 0 0 40 56"),
]


def build(root: Path, missing: int = 0) -> dict[str, tuple[tuple[int, int], str]]:
    """Write both tables and the JPGs; image name -> (size, annotation). The last `missing` train rows
    are listed without an image."""
    truth = {}
    train_rows = [r for r in ROWS if r[0] == "train"]
    for pool in ("train", "dev"):
        lines = ["image_name,annotation"]
        for k, (_, name, (w, h), annotation) in enumerate(r for r in ROWS if r[0] == pool):
            lines.append(f"{name},{annotation}")
            truth[name] = ((w, h), annotation)
            if not (pool == "train" and k >= len(train_rows) - missing):
                write_picture(root / pool / name, radiograph(h, w, seed=k))
        (root / f"{pool}.csv").write_text("\n".join(lines) + "\n")
    return truth


def set_annotation(root: Path, pool: str, index: int, annotation: str) -> int:
    """Replace the annotation of data row `index` (0-based) of <pool>.csv; its line number (header = 1)."""
    path = root / f"{pool}.csv"
    lines = path.read_text().splitlines()
    name = lines[index + 1].split(",")[0]
    lines[index + 1] = f"{name},{annotation}"
    path.write_text("\n".join(lines) + "\n")
    return index + 2
