"""COVIDx as distributed: headerless, space-separated lists `patient_id filename class data_source`
(train.txt / test.txt, or versioned names like train_COVIDx9A.txt) and the images in train/ and test/."""

from __future__ import annotations

from pathlib import Path

from tests.layouts import radiograph, write_picture

# (patient, filename stem, class, data source) per image; patients "3" of two sources are two people
TRAIN = [
    ("3", "SARS-fig8a-day0", "pneumonia", "cohen"),
    ("3", "SARS-fig8b-day5", "pneumonia", "cohen"),
    ("3", "covid-19-pneumonia-2", "COVID-19", "sirm"),
    ("4", "nejmc2001573_f1a", "COVID-19", "cohen"),
    ("a1b2c3d4-0001", "a1b2c3d4-0001", "normal", "rsna"),
    ("a1b2c3d4-0002", "a1b2c3d4-0002", "normal", "rsna"),
    ("a1b2c3d4-0003", "a1b2c3d4-0003", "pneumonia", "rsna"),
    ("419639-000025", "MIDRC-RICORD-1C-419639-000025-50888-0", "COVID-19", "ricord"),
    ("419639-000025", "MIDRC-RICORD-1C-419639-000025-50888-1", "COVID-19", "ricord"),
]
TEST = [
    ("e5f6-0001", "e5f6-0001", "normal", "rsna"),
    ("e5f6-0002", "e5f6-0002", "pneumonia", "rsna"),
    ("419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0", "COVID-19", "ricord"),
]


def build(root: Path, train_name: str = "train.txt", test_name: str = "test.txt", missing: int = 0,
          columns: int = 4) -> dict[str, str]:
    """Write the lists and images; filename -> class as written. Even rows are PNG, odd rows JPG (as in
    COVIDx, where the format follows the source). `missing` test-list images are listed but not written;
    `columns=3` writes the oldest lists' form, without data_source."""
    truth = {}
    for pool, name, rows in (("train", train_name, TRAIN), ("test", test_name, TEST)):
        lines = []
        for k, (patient, stem, cls, source) in enumerate(rows):
            filename = f"{stem}.{'png' if k % 2 == 0 else 'jpg'}"
            lines.append(" ".join([patient, filename, cls, source][:columns]))
            truth[filename] = cls
            if not (pool == "test" and k >= len(rows) - missing):
                write_picture(root / pool / filename, radiograph(48 + 4 * k, 40, seed=k))
        (root / name).write_text("\n".join(lines) + "\n")
    return truth


def replace_line(path: Path, index: int, text: str) -> None:
    """Overwrite line `index` (0-based) of a list file."""
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")
