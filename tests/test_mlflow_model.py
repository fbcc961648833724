"""Registered models are MLflow models: `mlflow.pyfunc.load_model` predicts what `g2d.predict` predicts, from
PNG and DICOM bytes; bad requests are one clear message; `mlflow models serve` answers the same over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

import g2d
from g2d import serving
from tests.conftest import free_port
from tests.layouts import write_dicom
from tests.test_zeroshot import _gradient

PROMPTS = ["lung opacity", "no lung opacity"]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _dicom_bytes(tmp_path, pixels: np.ndarray) -> bytes:
    return write_dicom(tmp_path / f"x{pixels.ndim}.dcm", pixels).read_bytes()


def test_the_registered_encoder_predicts_like_g2d_from_png_and_dicom(project, tmp_path):
    from mlflow import MlflowClient

    img = _gradient()
    model = mlflow.pyfunc.load_model("models:/g2d-encoder/1")
    request = pd.DataFrame({"image": [_png(img), _dicom_bytes(tmp_path, img.astype(np.uint16) * 16)],
                            "prompts": [PROMPTS, PROMPTS[:1]]})
    png, dcm = model.predict(request)
    want = g2d.predict(img, PROMPTS, model=g2d.load_model("g2d"))
    assert png["prompts"] == PROMPTS and np.allclose(png["scores"], want.scores, atol=1e-6)
    assert np.asarray(png["heatmaps"]).shape == (2, *img.shape)
    assert np.allclose(png["heatmaps"], want.heatmaps, atol=1e-6)
    assert np.allclose(dcm["scores"], want.scores[:1], atol=1e-5)  # the 12-bit DICOM of the same picture

    # what MLflow knows of it: a signature, pinned requirements, a run that lists it (the UI's Models column)
    info = mlflow.models.get_model_info("models:/g2d-encoder/1")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["image", "prompts"]
    version = MlflowClient().get_model_version("g2d-encoder", "1")
    [output] = MlflowClient().get_run(version.run_id).outputs.model_outputs
    assert version.source == f"models:/{output.model_id}"
    requirements = mlflow.pyfunc.get_model_dependencies("models:/g2d-encoder/1")
    assert "torch==" in open(requirements).read()


@pytest.mark.parametrize(("row", "message"), [
    ({"image": b"not an image", "prompts": PROMPTS}, "row 0: the image is corrupt or not an image"),
    ({"image": b"", "prompts": PROMPTS}, "row 0: 'image' is empty"),
    ({"image": "multi-frame", "prompts": PROMPTS}, "row 0: the DICOM holds 2 frames; send a single-frame"),
    ({"image": "too large", "prompts": PROMPTS}, "row 0: the image is 1100 x 1000 px, over the limit of 1,048,576"),
    ({"image": "png", "prompts": []}, "row 0: give at least one non-empty prompt in 'prompts'"),
    ({"image": "png", "prompts": [" "]}, "row 0: give at least one non-empty prompt"),
])
def test_bad_requests_are_one_clear_message(project, tmp_path, row, message):
    images = {"multi-frame": lambda: _dicom_bytes(tmp_path, np.zeros((2, 8, 8), np.uint16)),
              "too large": lambda: _png(np.zeros((1000, 1100), np.uint8)), "png": lambda: _png(_gradient())}
    if isinstance(row["image"], str):
        row = {**row, "image": images[row["image"]]()}
    served = serving.load(project / "models" / "pretrain")
    with pytest.raises(serving.RequestError, match=message):
        serving.predict(served, pd.DataFrame([row]))
    model = mlflow.pyfunc.load_model("models:/g2d-encoder/1")
    with pytest.raises(MlflowException, match=message) as e:
        model.predict(pd.DataFrame([row]))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and len(str(e.value).splitlines()) == 1


def test_a_request_without_prompts_names_the_columns(project):
    served = serving.load(project / "models" / "pretrain")
    with pytest.raises(serving.RequestError, match=r"the request has columns \['image'\]; this g2d-encoder model "
                                                   r"needs \['image', 'prompts'\]"):
        serving.predict(served, pd.DataFrame({"image": [_png(_gradient())]}))


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _split(images: list[bytes], prompts: list[list[str]] | None = None) -> dict:
    columns = ["image"] + (["prompts"] if prompts is not None else [])
    rows = [[base64.b64encode(b).decode()] + ([p] if prompts is not None else []) for b, p in
            zip(images, prompts or [None] * len(images), strict=True)]
    return {"dataframe_split": {"columns": columns, "data": rows}}


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_g2d_and_keeps_serving(project, tmp_path):
    """The real server process: a PNG and a DICOM answered with g2d.predict's numbers; each bad request a 400
    with one line; the server still answers after them."""
    img = _gradient()
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/g2d-encoder/1",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)
        want = g2d.predict(img, PROMPTS, model=g2d.load_model("g2d"))
        dicom = _dicom_bytes(tmp_path, img.astype(np.uint16) * 16)
        status, body = _post(port, _split([_png(img), dicom], [PROMPTS, PROMPTS]))
        assert status == 200, body
        for answer in body["predictions"]:
            assert np.allclose(answer["scores"], want.scores, atol=1e-5)
            assert np.allclose(answer["heatmaps"], want.heatmaps, atol=1e-5)
        bad = {"not an image": (_split([b"nope"], [PROMPTS]), "row 0: the image is corrupt or not an image"),
               "empty": (_split([b""], [PROMPTS]), "row 0: 'image' is empty"),
               "multi-frame": (_split([_dicom_bytes(tmp_path, np.zeros((2, 8, 8), np.uint16))], [PROMPTS]),
                               "holds 2 frames"),
               "too large": (_split([_png(np.zeros((1000, 1100), np.uint8))], [PROMPTS]), "over the limit"),
               "no prompt": (_split([_png(img)], [[]]), "give at least one non-empty prompt")}
        for what, (request, message) in bad.items():
            status, body = _post(port, request)
            assert 400 <= status < 500, (what, status, body)
            assert message in body["message"] and "Traceback" not in body["message"], (what, body)
        status, body = _post(port, _split([_png(img)], [PROMPTS]))
        assert status == 200 and np.allclose(body["predictions"][0]["scores"], want.scores, atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
