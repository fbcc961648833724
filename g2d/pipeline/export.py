"""`g2d models export`: a G2D image encoder's weights under timm's or torchvision's own names, so it drops into
pipelines built on those libraries without reading g2d's code.

smp's ResNet encoders are torchvision ResNets without `avgpool` / `fc`, and timm's ResNets use the same names,
so the mapping is the identity on names; two things change. The first convolution: g2d reads one grey channel,
the libraries' models three, so its kernel is repeated over three channels and divided by three (a grey image
repeated into three channels then gives the same features). And there is no classifier: load into a model
built without one (timm `num_classes=0`, torchvision `fc = Identity()`). The file is safetensors, never a
pickle; its metadata says how it was made and what input it expects."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from g2d import __version__
from g2d.errors import G2DError
from g2d.pipeline import model_files

FORMATS = ("timm", "torchvision")
# smp encoder name -> the same network in timm / torchvision (all ResNet-family, key-compatible)
ARCHS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
         "resnet152": "resnet152", "resnext50_32x4d": "resnext50_32x4d", "resnext101_32x8d": "resnext101_32x8d"}
STEM = "encoder.conv1.weight"  # the image tower's first weight: unet.encoder. (pre-trained, segmentation), encoder.
INPUT = ("one grey image in [0, 1] (no mean / std), repeated into 3 channels; H and W multiples of 32")


class ExportError(G2DError):
    """A model that cannot be exported in the format asked for."""


@dataclass(frozen=True)
class Exported:
    path: Path
    arch: str
    fmt: str
    output_stride: int
    tensors: int
    load: str  # the Python lines that load it
    note: str | None  # what the library's model cannot reproduce, if anything


def encoder_weights(folder: Path) -> tuple[dict, dict]:
    """(name -> tensor of the image encoder under smp's names, the folder's config) of a g2d model folder."""
    config = model_files.read_config(folder)
    weights = model_files.read_weights(folder / model_files.WEIGHTS, ExportError)
    stems = [k for k in weights if k == STEM or k.endswith("." + STEM)]
    if len(stems) != 1:
        raise ExportError(f"{folder / model_files.WEIGHTS}: {len(stems)} image encoders (*{STEM}) in it, not one; "
                          "export a model written by `g2d pretrain` or `g2d train`")
    prefix = stems[0].removesuffix("conv1.weight")
    return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}, config


def library_weights(state: dict) -> dict:
    """smp's ResNet weights as the libraries' 3-channel ResNet: the grey kernel spread over R, G and B."""
    out = dict(state)
    conv1 = state["conv1.weight"]
    if conv1.shape[1] == 1:
        out["conv1.weight"] = (conv1.repeat(1, 3, 1, 1) / 3).contiguous()
    return out


def export(folder: Path, fmt: str, out: Path, source: str) -> Exported:
    """Write `folder`'s image encoder for `fmt` (timm or torchvision) to `out` (.safetensors)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    state, config = encoder_weights(folder)
    model = config.get("model", {})
    encoder, stride = model.get("encoder"), int(model.get("output_stride", 32))
    arch = ARCHS.get(encoder)
    if arch is None:
        raise ExportError(f"{source}: encoder {encoder!r} has no {fmt} counterpart here; export supports "
                          f"{', '.join(ARCHS)}")
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: name it *.safetensors (the file is safetensors, loadable without pickle)")
    weights = library_weights(state)
    meta = {"g2d_version": __version__, "source": source, "arch": arch, "format": fmt,
            "output_stride": str(stride), "input": INPUT}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=meta)
    load, note = _how_to_load(fmt, arch, stride, out)
    return Exported(out, arch, fmt, stride, len(weights), load, note)


def _how_to_load(fmt: str, arch: str, stride: int, out: Path) -> tuple[str, str | None]:
    if fmt == "timm":
        load = f"m = timm.create_model({arch!r}, pretrained=False, num_classes=0, checkpoint_path={str(out)!r})"
        features = "m.forward_features(x)"
    else:
        load = (f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity(); "
                f"m.load_state_dict(safetensors.torch.load_file({str(out)!r}))")
        features = "torch.nn.Sequential(*list(m.children())[:-2])(x)"
    if stride == 32:
        return f"{load}; features: {features}", None
    rate = 32 // stride
    dilate = ("for c in m.layer4.modules():\n    if isinstance(c, torch.nn.Conv2d):\n        c.stride, c.dilation, "
              f"c.padding = (1, 1), ({rate}, {rate}), (c.kernel_size[0] // 2 * {rate},) * 2")
    return (f"{load}; features: {features}",
            f"g2d dilates every convolution of the last stage (model.output_stride = {stride}, smp's make_dilated), "
            f"which neither library's own output_stride / replace_stride_with_dilation reproduces (they keep the "
            f"stage's first block undilated); after loading, dilate as g2d does:\n{dilate}")
