"""Image packs (g2d/data/packed.py) and PairDataset's compact rows: same pixels as the PNG path, stale or
half-written packs refused, and no per-row Python objects held by the dataset."""

from __future__ import annotations

import gc
import json
import os
import pickle
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from g2d.data import manifest as mf
from g2d.data import packed, pairs
from g2d.data.pairs import Collate, PairDataset, Rows, StringColumn, seed_worker
from g2d.errors import DataError

SIZE = 24


def _dataset(folder, n: int = 10, seed: int = 0):
    """n rows of odd-sized L and RGB images (train / val), reports of varying length with non-ASCII text,
    and a finding mask on every third row."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for i in range(n):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        if i % 2:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        else:
            im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        im.save(folder / f"images/r{i}.png")
        findings = []
        if i % 3 == 0:
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4:h // 2, w // 4:w // 2] = 255
            Image.fromarray(mask).save(folder / f"masks/r{i}_0.png")
            findings = [{"kind": "opacity", "mask": f"masks/r{i}_0.png"}]
        rows.append({"id": f"r{i}", "image": f"images/r{i}.png", "patient_id": f"p{i}", "split": "val" if i % 4 == 3
                     else "train", "report": "Opacité " * (i + 1) + f"row {i}.", "findings": findings})
    mf.write_manifest(rows, folder)
    return folder


@pytest.fixture
def data(tmp_path):
    folder = _dataset(tmp_path / "ds")
    pack_path = packed.pack_manifest(folder, SIZE, tmp_path / "cache" / "images.npy")
    return folder, pack_path


def _items_equal(a: dict, b: dict) -> bool:
    """Equal keys and values; tensors equal elementwise, dicts (the finding masks by kind) key by key."""
    def same(x, y) -> bool:
        if isinstance(x, dict):
            return isinstance(y, dict) and _items_equal(x, y)
        return torch.equal(x, y) if torch.is_tensor(x) else x == y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def test_pack_round_trip_equals_pil_resize(data):
    folder, pack_path = data
    images = list(mf.read_manifest(folder)["image"])
    reader = packed.PackedImages.open(pack_path, folder, images, SIZE)
    assert len(reader) == len(images) == len(np.load(pack_path, mmap_mode="r"))
    for i, rel in enumerate(images):
        with Image.open(folder / rel) as im:
            expected = np.asarray(im.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        got = reader[i]
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
        got[:] = 0  # a fresh, writable copy each read: the pack is unchanged
        assert np.array_equal(reader[i], expected)
    with pytest.raises(IndexError):
        reader[len(images)]


def test_pack_in_worker_processes_equals_one_process(data, tmp_path):
    folder, pack_path = data
    images = list(mf.read_manifest(folder)["image"])
    serial = np.load(pack_path)
    again = packed.pack(folder, images, SIZE, tmp_path / "two.npy", workers=2)
    assert np.array_equal(np.load(again), serial)
    reader = pickle.loads(pickle.dumps(packed.PackedImages.open(pack_path, folder, images)))  # a spawned worker's copy
    assert reader._fd is None and np.array_equal(reader[3], serial[3])


def test_stale_pack_is_refused_naming_the_file(data):
    folder, pack_path = data
    PairDataset(folder, "train", SIZE, packed=pack_path)  # fresh: accepted
    with pytest.raises(DataError, match=rf"{pack_path}.*stale.*pack_manifest"):
        PairDataset(folder, "train", SIZE + 8, packed=pack_path)  # another size
    df = mf.read_manifest(folder)
    df.loc[0, "report"] = "changed"
    mf.write_manifest(df, folder)
    with pytest.raises(DataError, match=rf"{pack_path}: stale image pack.*manifest_sha256.*pack_manifest"):
        PairDataset(folder, "train", SIZE, packed=pack_path)
    packed.sidecar_path(pack_path).unlink()
    with pytest.raises(DataError, match=rf"{pack_path}: its sidecar .* missing"):
        PairDataset(folder, "train", SIZE, packed=pack_path)
    with pytest.raises(DataError, match="no image pack here"):
        PairDataset(folder, "train", SIZE, packed=folder / "nothing.npy")


def test_a_crash_while_packing_leaves_no_half_pack(data, tmp_path, monkeypatch):
    folder, pack_path = data
    before = np.load(pack_path)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # the run is killed part-way
        return real(*args, **kwargs)

    real = packed.read_resized
    monkeypatch.setattr(packed, "read_resized", failing)
    fresh = tmp_path / "fresh" / "images.npy"
    with pytest.raises(KeyboardInterrupt):
        packed.pack_manifest(folder, SIZE, fresh)
    assert list(fresh.parent.iterdir()) == []  # no pack, no sidecar, no temporary file
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        packed.pack_manifest(folder, SIZE, pack_path)  # re-packing over a good pack
    assert sorted(p.name for p in pack_path.parent.iterdir()) == ["images.npy", "images.npy.json"]
    ds = PairDataset(folder, None, SIZE, packed=pack_path)  # the old pack is intact and still matches
    assert np.array_equal(np.stack([ds.packed[i] for i in range(len(before))]), before)


@pytest.mark.parametrize("split, kwargs", [("train", {"augment": True, "seed": 5}), ("val", {"with_masks": True}),
                                           (None, {})])
def test_packed_items_identical_to_png_items(data, split, kwargs):
    folder, pack_path = data
    plain = PairDataset(folder, split, SIZE, **kwargs)
    fast = PairDataset(folder, split, SIZE, packed=pack_path, **kwargs)
    assert len(plain) == len(fast) > 0
    for ds in (plain, fast):
        ds.set_epoch(3)
    for i in range(len(plain)):
        assert _items_equal(plain[i], fast[i])


def test_forked_workers_read_the_pack_themselves(data):
    folder, pack_path = data
    ds = PairDataset(folder, "train", SIZE, packed=pack_path)
    ds[0]  # the main process opens its descriptor before the fork
    collate = Collate(lambda texts, **kw: {"input_ids": torch.zeros(len(texts), 1), "attention_mask":
                                           torch.ones(len(texts), 1)}, 8)
    one = [b["image"] for b in DataLoader(ds, batch_size=3, collate_fn=collate)]
    two = [b["image"] for b in DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=2,
                                          multiprocessing_context="fork", worker_init_fn=seed_worker)]
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_rows_hold_numpy_buffers_not_python_objects(data):
    folder, _ = data
    ds = PairDataset(folder, "train", SIZE)
    df = mf.read_manifest(folder)
    train = df[df["split"] == "train"].reset_index(drop=True)
    assert isinstance(ds.rows, Rows) and not isinstance(ds.rows, pd.DataFrame)
    assert ds.rows.columns == ["id", "image", "report", "findings"]
    for name in ds.rows.columns:
        col = ds.rows[name]
        assert isinstance(col, StringColumn) and col.data.dtype == np.uint8 and col.offsets.dtype == np.int64
        assert list(col) == list(train[name]) and col[-1] == train[name].iloc[-1]
    assert ds.rows.manifest_index.dtype == np.int64
    assert ds.rows.row(1)["report"] == train.loc[1, "report"]
    # what pretrain.py reads
    assert sorted(ds.rows["id"]) == sorted(train["id"])
    assert [i for i, f in enumerate(ds.rows.get("findings", [])) if f and f != "[]"] == \
        [i for i, f in enumerate(train["findings"]) if f and f != "[]"]
    assert ds.rows.get("boxes") is None
    with pytest.raises(KeyError, match="keeps only"):
        ds.rows["split"]


def test_rows_selected_in_a_child_equal_rows_selected_here(data, monkeypatch):
    folder, pack_path = data
    args = (folder, "train", SIZE, {"r0", "r2", "r4"}, pack_path)
    here, _ = pairs.select_rows(*args)
    there, pack = pairs.select_rows_isolated(*args)
    assert there.columns == here.columns and list(there["report"]) == list(here["report"]) == [
        "Opacité " * (i + 1) + f"row {i}." for i in (0, 2, 4)]
    assert np.array_equal(there.manifest_index, here.manifest_index) and pack.count == 10
    assert not there["report"].data.flags.writeable
    with pytest.raises(DataError, match="no rows in split 'test'"):  # raised in the child, re-raised here
        pairs.select_rows_isolated(folder, "test", SIZE, None, None)
    parent, real = os.getpid(), pairs.select_rows
    monkeypatch.setattr(pairs, "select_rows", lambda *a: os._exit(3) if os.getpid() != parent else real(*a))
    rows, _ = pairs.select_rows_isolated(*args)  # the child died: selected here instead
    assert list(rows["id"]) == ["r0", "r2", "r4"]


def _python_objects(root) -> int:
    """Objects reachable from root (not following modules, classes or functions)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return len(seen)


def test_python_objects_do_not_grow_with_rows(tmp_path):
    small = PairDataset(_dataset(tmp_path / "small", n=8), None, SIZE)
    large = PairDataset(_dataset(tmp_path / "large", n=80), None, SIZE)
    assert len(large) == 10 * len(small)
    assert _python_objects(large) == _python_objects(small)


def test_pack_records_what_it_was_built_from(data):
    folder, pack_path = data
    meta = json.loads(packed.sidecar_path(pack_path).read_text())
    images = list(mf.read_manifest(folder)["image"])
    assert meta == {"format": packed.FORMAT, "size": SIZE, "count": len(images),
                    "images_sha256": packed.images_sha256(images),
                    "manifest_sha256": mf.file_sha256(folder / mf.MANIFEST), "dataset_sha256": None}
    with pytest.raises(DataError, match="no images to pack"):
        packed.pack(folder, [], SIZE, folder / "empty.npy")


def test_pretraining_from_a_pack_trains_the_same_weights(tmp_path, mlflow_template_db, monkeypatch):
    """pretrain.pack only changes where pixels come from: the same weights, bit for bit; the pack is built
    once, named after the dataset's hash and the size, and reused."""
    import shutil

    from safetensors.torch import load_file

    from g2d.config import load_params
    from g2d.pipeline.pretrain import stage as pretrain
    from tests.conftest import tiny_synthcxr_project

    root = tmp_path / "project"
    tiny_synthcxr_project(root)
    shutil.copyfile(mlflow_template_db, root / "mlflow.db")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for var in ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    common = ["pretrain.max_steps=2", "pretrain.grid_every=1000"]
    files = load_params(root / "params.yaml", [*common, "pretrain.name=files"])
    packed = load_params(root / "params.yaml", [*common, "pretrain.name=packed", "pretrain.pack=true"])
    a = load_file(pretrain.run(files).model_dir / "model.safetensors")
    b = load_file(pretrain.run(packed).model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    [pack] = (root / "packs").glob("*.npy")
    assert pack.name.endswith(f"-{packed.pretrain.image_size}.npy")
    built = pack.stat().st_mtime_ns
    pretrain.run(packed)
    assert pack.stat().st_mtime_ns == built  # reused, not rebuilt
