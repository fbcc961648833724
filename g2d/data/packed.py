"""Pre-resized 8-bit grayscale images in one .npy file, so training at scale skips PNG decoding.

Why: decoding and resizing a 512 px PNG costs milliseconds per read, every epoch; a pack holds each image
already resized to the training size, so a read is one copy out of the page cache. The file is a plain
(N, size, size) uint8 .npy (`np.load(path, mmap_mode="r")` maps it for ad-hoc use), written in order under
a temporary name and renamed into place only when complete, with a JSON sidecar (`<pack>.json`) recording
what it was built from; a pack whose manifest, image list, dataset hash or size differs is refused.

Readers never load the pack: each process opens the file itself, lazily (so a dataloader worker forked
after the dataset was built gets its own descriptor), and reads one image with `os.preadv` into a fresh
array. Reading through a memory map is as fast but leaves the pages touched (and read ahead) mapped in the
reader, so a worker's resident memory grows with the pack over an epoch (benchmarks/data_scaling.py
measures both); preadv leaves the bytes in the shared page cache, where the kernel can drop them.

Resizing is `read_resized`, the one function PairDataset also uses for PNGs, so the pixels are the same
whichever way the images are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from g2d.data import manifest as mf
from g2d.data.images import read_gray8
from g2d.errors import DataError

FORMAT = 1  # bump when the file layout or the resizing changes: older packs are then refused
_CHUNK = 64  # images a pack worker resizes per task


def read_resized(folder: Path, rel: str, size: int,
                 resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """The image `rel` of the dataset `folder` as an 8-bit grayscale (L) image of size x size: the training
    pixels, whether read from PNGs per item or packed once. DICOM, 16-bit and float files are read as
    `images.read_gray8` reads them (scaled, not clipped; NaN refused)."""
    path = mf.resolve(folder, rel, f"{folder / mf.MANIFEST}")
    try:
        return read_gray8(path).resize((size, size), resample)
    except (DataError, OSError) as e:
        raise DataError(f"{e}; `g2d data validate {folder}` lists every bad file") from None


def sidecar_path(pack_path: Path) -> Path:
    return Path(f"{pack_path}.json")


def images_sha256(rel_paths: Iterable[str]) -> str:
    """SHA-256 of the ordered image list: the pack's row i is the image rel_paths[i]."""
    h = hashlib.sha256()
    for rel in rel_paths:
        h.update(str(rel).encode() + b"\n")
    return h.hexdigest()


def source_identity(folder: Path, rel_paths: Sequence[str]) -> dict:
    """What a pack must agree on with the dataset it is read for: the manifest's bytes, the dataset's
    content hash (dataset.json, covering every image; None when there is none) and the image list."""
    manifest = mf.manifest_path(folder)
    if not manifest.is_file():
        raise DataError(f"{manifest}: no manifest here; a pack is built for a dataset folder holding one")
    return {"manifest_sha256": mf.file_sha256(manifest),
            "dataset_sha256": mf.read_info(manifest.parent).get("sha256"),
            "images_sha256": images_sha256(rel_paths), "count": len(rel_paths)}


def _resize_chunk(folder: Path, rels: list[str], size: int) -> np.ndarray:
    out = np.empty((len(rels), size, size), dtype=np.uint8)
    for k, rel in enumerate(rels):
        out[k] = np.asarray(read_resized(folder, rel, size))
    return out


def _chunks(folder: Path, rel_paths: Sequence[str], size: int, workers: int):
    """Resized chunks in order; at most two chunks per worker in flight, so memory stays flat."""
    starts = range(0, len(rel_paths), _CHUNK)
    if workers <= 1 or len(rel_paths) <= _CHUNK:
        for k in starts:
            yield k, _resize_chunk(folder, list(rel_paths[k:k + _CHUNK]), size)
        return
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        pending: deque = deque()
        for k in starts:
            pending.append((k, pool.submit(_resize_chunk, folder, list(rel_paths[k:k + _CHUNK]), size)))
            if len(pending) >= 2 * workers:
                k0, fut = pending.popleft()
                yield k0, fut.result()
        while pending:
            k0, fut = pending.popleft()
            yield k0, fut.result()


def pack(folder: Path, rel_paths: Sequence[str], size: int, out_path: Path,
         progress: Callable[[int], None] | None = None, workers: int = 1) -> Path:
    """Write the images `rel_paths` (relative to the dataset `folder`) resized to size x size into the
    .npy pack `out_path`, row i = rel_paths[i]; `workers` processes resize (0 = all cores). The pack is
    written under a temporary name and renamed into place only when complete, so a crash never leaves a
    half pack; the sidecar goes last, so a pack without a matching one is refused rather than trusted."""
    folder, out_path = Path(folder), Path(out_path)
    rel_paths = [str(r) for r in rel_paths]
    if not rel_paths:
        raise DataError(f"{out_path}: no images to pack from {folder}")
    identity = source_identity(folder, rel_paths)  # before reading images: a mid-pack change is then stale
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp_sidecar = sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # written in order, not through a map: the packer's memory stays flat too
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (len(rel_paths), size, size)}
            np.lib.format.write_array_header_1_0(f, header)
            for _, chunk in _chunks(folder, rel_paths, size, workers or os.cpu_count() or 1):
                f.write(np.ascontiguousarray(chunk, dtype=np.uint8).data)
                if progress:
                    progress(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        meta = {"format": FORMAT, "size": size, **identity}
        tmp_sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        sidecar.unlink(missing_ok=True)  # an old sidecar must never describe the new pack
        os.replace(tmp, out_path)
        os.replace(tmp_sidecar, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    return out_path


def pack_manifest(folder: Path, size: int, out_path: Path, progress: Callable[[int], None] | None = None,
                  workers: int = 1) -> Path:
    """Pack every image of the dataset's manifest, in manifest order: the pack PairDataset reads
    (`PairDataset(..., packed=out_path)`, any split)."""
    images = mf.read_manifest(folder)["image"]
    return pack(folder, list(images), size, out_path, progress, workers)


class PackedImages:
    """Read-only access to a pack, one image at a time. Holds only the file's name and layout; the file is
    opened on first read in each process (a forked worker opens its own), and nothing is cached."""

    def __init__(self, path: Path, size: int, count: int, offset: int) -> None:
        self.path, self.size, self.count, self.offset = Path(path), size, count, offset
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def open(cls, path: Path, folder: Path, rel_paths: Sequence[str], size: int | None = None) -> PackedImages:
        """The pack at `path`, checked against the dataset `folder` and its ordered image list (and `size`,
        when given); a pack built from anything else is refused with a DataError saying how to rebuild it."""
        path = Path(path)
        rebuild = (f"rebuild it with g2d.data.packed.pack_manifest({str(folder)!r}, "
                   f"{size or 'size'}, {str(path)!r})")
        if not path.is_file():
            raise DataError(f"{path}: no image pack here; {rebuild}")
        try:
            meta = json.loads(sidecar_path(path).read_text())
        except (OSError, ValueError):
            raise DataError(f"{path}: its sidecar {sidecar_path(path).name} is missing or unreadable, so the pack "
                            f"cannot be trusted; {rebuild}") from None
        expected = {"format": FORMAT, **source_identity(Path(folder), rel_paths)}
        if size is not None:
            expected["size"] = size
        stale = [k for k, v in expected.items() if meta.get(k) != v]
        if stale:
            raise DataError(f"{path}: stale image pack, built for a different dataset ({', '.join(stale)} differ from "
                            f"{mf.manifest_path(Path(folder))}); {rebuild}")
        try:
            view = np.load(path, mmap_mode="r")  # maps the header's layout; no pixel is read
            shape, dtype, offset, contiguous = view.shape, view.dtype, view.offset, view.flags.c_contiguous
            del view
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy image pack ({e}); {rebuild}") from None
        if dtype != np.uint8 or not contiguous or shape != (meta["count"], meta["size"], meta["size"]):
            raise DataError(f"{path}: holds {dtype} {shape}, its sidecar says uint8 "
                            f"{(meta['count'], meta['size'], meta['size'])}; {rebuild}")
        return cls(path, meta["size"], meta["count"], offset)

    def __len__(self) -> int:
        return self.count

    def _file(self) -> int:
        if self._pid != os.getpid():  # first read in this process (a forked worker inherits no descriptor)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, index: int) -> np.ndarray:
        """Image `index` as a (size, size) uint8 array (a fresh copy: the caller may keep or modify it)."""
        if not 0 <= index < self.count:
            raise IndexError(f"{self.path}: image {index} of {self.count}")
        image = np.empty((self.size, self.size), dtype=np.uint8)
        if os.preadv(self._file(), [image], self.offset + index * image.nbytes) != image.nbytes:
            raise DataError(f"{self.path}: truncated at image {index}; rebuild the pack")
        return image

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}  # a descriptor never travels to another process

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
