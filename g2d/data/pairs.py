"""Image-report pairs for pre-training, as a torch Dataset over a manifest split.

Images are read from the manifest's folder and resized to the training size, or, given a pack
(g2d/data/packed.py: the manifest's images pre-resized once), copied out of it with the same pixels;
training images get a light, seeded augmentation (random resized crop, small rotation) whose randomness
depends only on (seed, epoch, row), so a run is reproducible whatever the number of workers. Tokenisation
happens in the collate function, i.e. in the dataloader workers, with padding to the batch's longest report.

The per-row text (ids, reports, image paths, findings) lives in numpy buffers (`StringColumn`), never in
Python objects: a forked dataloader worker that touches a Python object writes its refcount, which copies
the page, so lists or object columns make every worker's resident memory grow with the dataset (PyTorch
issue #13246); two numpy buffers per column are read, never written, and stay shared. The manifest is
parsed in a short-lived child process (`select_rows_isolated`), so its garbage never fragments the heap
the workers inherit, and `seed_worker` keeps the workers' garbage collector off inherited objects. What
still grows with the manifest is the row text itself, once (about 0.5 kB a row for IU-length reports).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import select
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from g2d.data import manifest as mf
from g2d.data.packed import PackedImages, read_resized
from g2d.errors import DataError

ROW_COLUMNS = ("id", "image", "report", "findings")
CHILD_TIMEOUT_S = 120  # what PairDataset keeps of each manifest row


class StringColumn(Sequence[str]):
    """Strings as one UTF-8 byte buffer plus int64 offsets: two numpy arrays whatever the row count,
    so reading a row in a forked worker touches no refcount (see the module docstring)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> StringColumn:
        encoded = [str(v).encode() for v in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return self.data[self.offsets[index]:self.offsets[index + 1]].tobytes().decode()

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


class Rows:
    """A PairDataset's rows, column by column (`rows["id"]`, `rows.get("findings")`, `rows.row(i)`): the
    read-only stand-in for the DataFrame it replaced, holding only StringColumns and numpy arrays."""

    def __init__(self, columns: dict[str, StringColumn], manifest_index: np.ndarray) -> None:
        self._columns = columns
        self.manifest_index = manifest_index  # int64: each row's position in the manifest (= its pack row)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, positions: np.ndarray) -> Rows:
        part = df.iloc[positions]
        return cls({c: StringColumn.from_strings(part[c]) for c in ROW_COLUMNS if c in df.columns},
                   np.asarray(positions, dtype=np.int64))

    def buffers(self) -> list[np.ndarray]:
        """Every numpy buffer, in the order from_buffers takes them."""
        return [b for col in self._columns.values() for b in (col.data, col.offsets)] + [self.manifest_index]

    @classmethod
    def from_buffers(cls, columns: list[str], buffers: list[np.ndarray]) -> Rows:
        pairs = iter(buffers[:-1])
        return cls({c: StringColumn(data, offsets) for c, data, offsets in zip(columns, pairs, pairs, strict=True)},
                   buffers[-1])

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def __len__(self) -> int:
        return len(self.manifest_index)

    def __contains__(self, column: str) -> bool:
        return column in self._columns

    def __getitem__(self, column: str) -> StringColumn:
        if column not in self._columns:
            raise KeyError(f"{column!r}: PairDataset keeps only the columns {self.columns}")
        return self._columns[column]

    def get(self, column: str, default=None):
        return self._columns.get(column, default)

    def row(self, index: int) -> dict[str, str]:
        return {c: col[index] for c, col in self._columns.items()}

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._columns.values()) + self.manifest_index.nbytes


def select_rows(folder: Path, split: str | None, size: int, ids: set[str] | None,
                packed: Path | None) -> tuple[Rows, PackedImages | None]:
    """The manifest rows of `split` (and `ids`) as Rows, and the checked pack when one is given."""
    df = mf.read_manifest(folder)
    if "report" not in df.columns:
        raise DataError(f"{folder / mf.MANIFEST}: no 'report' column; pre-training needs image-report pairs")
    keep = np.ones(len(df), dtype=bool)
    if split is not None:
        keep &= (df["split"] == split).to_numpy(dtype=bool) if "split" in df.columns else False
    if ids is not None:
        keep &= df["id"].isin(ids).to_numpy(dtype=bool)
    if not keep.any():
        raise DataError(f"{folder / mf.MANIFEST}: no rows in split {split!r}")
    return Rows.from_frame(df, np.flatnonzero(keep)), (
        PackedImages.open(packed, folder, df["image"], size) if packed is not None else None)


def select_rows_isolated(*args) -> tuple[Rows, PackedImages | None]:
    """select_rows in a forked child, whose buffers come back through a pipe straight into fresh anonymous
    maps. Why: parsing a manifest leaves the heap full of freed holes (tens of MB at 50k rows); dataloader
    workers forked from this process later allocate into those holes, each touching pages of its own, so
    every worker's memory would grow with the manifest (measured: 15-20 MB per worker at 50k rows). Outside
    Linux, or if the child dies, the rows are selected here."""
    if sys.platform != "linux":
        return select_rows(*args)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running any of the parent's exit handlers
        code = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                try:
                    rows, pack = select_rows(*args)
                    buffers = rows.buffers()
                    answer = ("rows", rows.columns, [(b.dtype.str, len(b)) for b in buffers], pack)
                except Exception as e:
                    answer, buffers = ("error", e), []
                header = pickle.dumps(answer)
                out.write(len(header).to_bytes(8, "little") + header)
                for b in buffers:
                    out.write(memoryview(b).cast("B"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        # a child that hangs (a lock another thread of this process held at the fork) is killed and the
        # rows are selected here instead
        if not select.select([read_end], [], [], CHILD_TIMEOUT_S)[0]:
            raise TimeoutError(f"the manifest child gave no answer in {CHILD_TIMEOUT_S} s")
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            length = int.from_bytes(_read_into(pipe, bytearray(8)), "little")
            message = pickle.loads(_read_into(pipe, bytearray(length)))
            buffers = []
            for dtype, n in message[2] if message[0] == "rows" else []:
                dtype = np.dtype(dtype)
                memory = mmap.mmap(-1, max(n * dtype.itemsize, 1))  # read straight in: no temporary copy
                _read_into(pipe, memoryview(memory)[:n * dtype.itemsize])
                buffers.append(np.frombuffer(memory, dtype=dtype, count=n))
                buffers[-1].flags.writeable = False
    except Exception:  # the child died, hung, or its answer cannot be read: select here instead (which shows why)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(read_end)  # when it was not handed to the reader yet
        return select_rows(*args)
    finally:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # SIGCHLD ignored: the child was reaped already
            pass
    if message[0] == "error":
        raise message[1]
    return Rows.from_buffers(message[1], buffers), message[3]


def _read_into(pipe, buffer):
    """Fill buffer from the pipe (EOFError if the writer stops short); returns buffer."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        n = pipe.readinto(view[done:])
        if not n:
            raise EOFError("the child closed the pipe early")
        done += n
    return buffer


class PairDataset(Dataset):
    """`packed`: a pack of the whole manifest's images at `size` (g2d.data.packed.pack_manifest), read
    instead of the PNGs; refused (DataError) when it was built for another manifest, dataset or size.
    Finding masks (`with_masks`) are always read from their PNGs."""

    def __init__(self, folder: Path, split: str | None, size: int, augment: bool = False, seed: int = 0,
                 ids: set[str] | None = None, with_masks: bool = False, packed: Path | None = None) -> None:
        self.folder = Path(folder)
        self.rows, self.packed = select_rows_isolated(self.folder, split, size, ids, packed)
        self.size, self.augment, self.seed, self.with_masks = size, augment, seed, with_masks
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, rel: str, resample: Image.Resampling) -> Image.Image:
        return read_resized(self.folder, rel, self.size, resample)

    def image(self, index: int) -> Image.Image:
        """Row `index`'s image at the training size (L mode), from the pack when there is one."""
        if self.packed is not None:
            return Image.fromarray(self.packed[int(self.rows.manifest_index[index])])  # uint8 2-D: mode L
        return self._load(self.rows["image"][index], Image.Resampling.BILINEAR)

    def _augment(self, image: Image.Image, mask: Image.Image | None, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        scale = rng.uniform(0.85, 1.0)
        side = int(round(self.size * scale))
        x0, y0 = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
        angle = float(rng.uniform(-7, 7))

        def apply(im: Image.Image, resample: Image.Resampling) -> Image.Image:
            im = im.crop((x0, y0, x0 + side, y0 + side)).resize((self.size, self.size), resample)
            return im.rotate(angle, resample=resample)

        return apply(image, Image.Resampling.BILINEAR), apply(mask, Image.Resampling.NEAREST) if mask else None

    def finding_masks(self, index: int) -> dict[str, np.ndarray]:
        """Row `index`'s rendered finding masks (SynthCXR) by kind, each the union of that kind's findings."""
        out: dict[str, np.ndarray] = {}
        findings = self.rows.get("findings")
        for f in json.loads((findings[index] if findings is not None else "") or "[]"):
            if f.get("mask"):
                mask = np.asarray(self._load(f["mask"], Image.Resampling.NEAREST)) > 0  # 0/1 or 0/255
                out[f["kind"]] = out[f["kind"]] | mask if f["kind"] in out else mask
        return out

    def __getitem__(self, index: int) -> dict:
        image = self.image(index)
        kinds = self.finding_masks(index) if self.with_masks else None
        mask = None
        if kinds is not None:  # their union, for scoring pseudo masks
            union = np.zeros((self.size, self.size), dtype=bool)
            for m in kinds.values():
                union |= m
            mask = Image.fromarray(union.astype(np.uint8) * 255)
        if self.augment:
            image, mask = self._augment(image, mask, index)
        item = {"index": index, "id": self.rows["id"][index], "report": self.rows["report"][index],
                "image": torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]}
        if mask is not None:
            item["mask"] = torch.from_numpy(np.asarray(mask) > 127)[None]
            if not self.augment:  # each kind apart, to score pseudo masks per kind (val is never augmented)
                item["finding_masks"] = {k: torch.from_numpy(m)[None] for k, m in kinds.items()}
        return item


class Collate:
    """Stack images and tokenise reports with padding to the longest in the batch (picklable, so
    it runs in the workers)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict:
        tokens = self.tokenizer([it["report"] for it in items], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = {"image": torch.stack([it["image"] for it in items]), "input_ids": tokens["input_ids"],
                 "attention_mask": tokens["attention_mask"], "id": [it["id"] for it in items],
                 "index": torch.tensor([it["index"] for it in items])}
        if "mask" in items[0]:
            batch["mask"] = torch.stack([it["mask"] for it in items])
        if "finding_masks" in items[0]:
            batch["finding_masks"] = [it["finding_masks"] for it in items]
        return batch


def seed_worker(worker_id: int) -> None:
    """Dataloader workers: numpy and random seeded from torch's per-worker seed; everything inherited from
    the main process frozen out of the garbage collector, whose full collections would otherwise write to
    every inherited object and so copy its page into the worker (memory per worker jumps by ~200 MB).
    SIGTERM / SIGINT sent to the whole process group (a scheduler, Ctrl-C) are the main process's to handle:
    it finishes the step and checkpoints, then shuts the workers down."""
    import gc

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import random

    gc.freeze()

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
