"""SynthCXR built from the real embedded sources, tiny: deterministic, leak-free, valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from g2d.config import Synth
from g2d.data import manifest as mf
from g2d.data.sources import embedded
from g2d.data.synthcxr import build
from g2d.errors import DataError

TINY = Synth(image_size=64, max_reports=24, pneumothorax={"count": 12}, opacity={"count": 12},
             splits={"val": 0.2, "test": 0.2}, workers=1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("sources")
    embedded.fetch(dest)
    return dest


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> build.BuildResult:
    return build.build(TINY, sources, tmp_path_factory.mktemp("synth") / "out")


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output_whatever_the_worker_count(built, sources, tmp_path):
    again = build.build(TINY.model_copy(update={"workers": 2}), sources, tmp_path / "again")
    assert tree_bytes(again.out) == tree_bytes(built.out)


def test_another_seed_changes_the_images(built, sources, tmp_path):
    other = build.build(TINY.model_copy(update={"seed": 99}), sources, tmp_path / "other")
    assert other.info["pretrain"]["sha256"] != built.info["pretrain"]["sha256"]


def test_every_set_validates_and_records_its_hash(built):
    for name in build.SETS:
        folder = built.out / name
        report = mf.validate(folder)
        assert report.ok, [str(p) for p in report.problems]
        info = json.loads((folder / mf.DATASET_INFO).read_text())
        assert info["sha256"] == mf.dataset_hash(folder)
    assert built.info["pretrain"]["rows"] == 24
    assert built.info["pneumothorax"]["positives"]["pneumothorax"] == 6


def test_no_patient_in_two_splits_and_fractions_nested(built):
    for name in build.SETS:
        df = mf.read_manifest(built.out / name)
        assert df.groupby("patient_id")["split"].nunique().max() == 1
        ids = {f: set((built.out / name / i["file"]).read_text().split()) for f, i in
               built.info[name]["fractions"].items()}
        train = set(df.loc[df["split"] == "train", "id"])
        assert ids["0.01"] <= ids["0.1"] <= ids["1"] == train


def test_pretrain_rows_pair_real_reports_with_drawn_findings(built):
    df = mf.read_manifest(built.out / "pretrain")
    assert df["report"].str.contains("FINDINGS:|IMPRESSION:").all()
    findings = [json.loads(c) for c in df["findings"]]
    drawn = [f for fs in findings for f in fs]
    assert drawn, "the first reports have findings to draw"
    for f in drawn:
        assert f["mask"].startswith("masks/") and len(f["box"]) == 4
    # labels follow what is drawn
    for (_, row), fs in zip(df.iterrows(), findings, strict=True):
        assert row["normal"] == int(not fs)


def test_dropped_items_are_counted(built):
    assert "IU reports beyond synth.max_reports" in built.dropped
    assert built.dropped["IU reports beyond synth.max_reports"] > 3800
    assert any(k.startswith("lung masks:") for k in built.dropped)
    assert sum(built.not_drawn.values()) > 0


def test_refuses_to_overwrite_a_foreign_folder(sources, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"is not a SynthCXR folder"):
        build.build(TINY, sources, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_an_interrupted_render_can_be_rerun_over_its_leftovers(built, sources, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_render_all", boom)
    with pytest.raises(KeyboardInterrupt):
        build.build(TINY, sources, out)
    assert json.loads((out / build.MARKER).read_text())["status"] == "rendering"
    monkeypatch.undo()
    again = build.build(TINY, sources, out)
    assert again.info["pretrain"]["sha256"] == built.info["pretrain"]["sha256"]
