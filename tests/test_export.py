"""`g2d models export`: a G2D image encoder loads into timm and torchvision under their own names and computes
the same features as g2d's encoder on the same image; bad requests are one line."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from g2d.cli import app
from g2d.config import Model
from g2d.model.g2d import G2D
from g2d.pipeline import model_files

TINY = Model(text_model="tiny", encoder="resnet18", decoder_channels=(16, 8, 8, 4, 4), text_frozen_layers=0,
             max_length=16, embed_dim=16, heads=2)
SIZE = 64


@pytest.fixture(autouse=True)
def params_file(project_dir):
    (project_dir / "params.yaml").write_text("")  # the defaults


def _model_folder(folder, output_stride: int = 32) -> G2D:
    torch.manual_seed(0)
    model = G2D(TINY.model_copy(update={"output_stride": output_stride}), 100, SIZE)
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so a mix-up would show
        for m in model.unet.encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model_files.save(model, SIZE, folder, "# card", extra={"kind": model_files.ENCODER_KIND})
    return model.eval()


def _image() -> torch.Tensor:
    return torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _export(tmp_path, fmt: str, folder) -> tuple[str, object]:
    out = tmp_path / f"{fmt}.safetensors"
    result = CliRunner().invoke(app, ["models", "export", str(folder), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, out


def _dilate_as_printed(said: str, net: torch.nn.Module) -> None:
    """Run the lines `g2d models export` prints for a stride-16 encoder, as a user would paste them."""
    code = said.split("after loading, dilate as g2d does:\n", 1)[1]
    exec(code, {"torch": torch, "m": net})


@pytest.mark.parametrize("output_stride", [32, 16])
def test_timm_loads_the_export_with_equal_features(tmp_path, output_stride):
    import timm

    g2d = _model_folder(tmp_path / "model", output_stride)
    said, out = _export(tmp_path, "timm", tmp_path / "model")
    assert "m = timm.create_model('resnet18', pretrained=False, num_classes=0, checkpoint_path=" in said
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, checkpoint_path=str(out)).eval()
    if output_stride == 16:
        _dilate_as_printed(said, net)
    x = _image()
    with torch.no_grad():
        ours, theirs = g2d.unet.encoder(x)[-1], net.forward_features(x.repeat(1, 3, 1, 1))
    assert ours.shape == theirs.shape == (2, 512, SIZE // output_stride, SIZE // output_stride)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output_stride", [32, 16])
def test_torchvision_loads_the_export_with_equal_features(tmp_path, output_stride):
    import torchvision
    from safetensors.torch import load_file

    g2d = _model_folder(tmp_path / "model", output_stride)
    said, out = _export(tmp_path, "torchvision", tmp_path / "model")
    assert "m.fc = torch.nn.Identity(); m.load_state_dict(safetensors.torch.load_file(" in said
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file(str(out)))  # strict: every name matches
    if output_stride == 16:
        _dilate_as_printed(said, net)
    body = torch.nn.Sequential(*list(net.children())[:-2]).eval()  # up to layer4: the last feature map
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(body(x.repeat(1, 3, 1, 1)), g2d.unet.encoder(x)[-1], rtol=1e-4, atol=1e-5)


def test_export_of_a_registered_version(mlflow_uri, tmp_path):
    import timm

    from g2d import tracking

    g2d = _model_folder(tmp_path / "model")
    with tracking.start_run("pretrain", config={"model": "tiny"}) as run:
        tracking.register_model_dir(run, tmp_path / "model", "g2d-encoder")
    said, out = _export(tmp_path, "timm", "g2d-encoder/latest")
    assert "of models:/g2d-encoder/1 (" in said
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, checkpoint_path=str(out)).eval()
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x.repeat(1, 3, 1, 1)), g2d.unet.encoder(x)[-1],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "onnx"], "--format 'onnx': use one of timm, torchvision"),
    (["--format", "timm", "--out", "x.pt"], "--out x.pt: name it *.safetensors"),
])
def test_export_bad_requests_are_one_line(tmp_path, args, message):
    _model_folder(tmp_path / "model")
    argv = ["models", "export", str(tmp_path / "model"), *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "e.safetensors")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert message in result.output
