"""Downstream networks around a (pre-trained) image encoder, as the paper transfers it:

- segmentation: the smp U-Net itself, encoder frozen (the paper's protocol) or fine-tuned, with a fresh
  decoder or the pre-trained one (the decoder G2D trained on pseudo masks);
- linear probe: the frozen encoder's pooled last feature map, standardised, and one linear layer;
- detection: torchvision's RetinaNet on an FPN over the encoder's last three feature maps (the paper
  used YOLOv3, which no maintained library here provides).

A frozen encoder is frozen twice: no parameter requires grad, and it stays in eval mode, so batch-norm
statistics do not drift either and its weights leave training bit-identical. It is then a fixed function of
the image, so each network splits into `encode` (the encoder's maps, which fine-tuning computes once per image
and caches) and `decode` (everything after them, the part that trains): `decode(encode(x)) == forward(x)`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


class _KeepsFrozenEval(nn.Module):
    """`train()` leaves the modules listed in `self._frozen` in eval mode."""

    _frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        return self


class SegmentationNet(_KeepsFrozenEval):
    def __init__(self, unet: nn.Module, freeze_encoder: bool) -> None:
        super().__init__()
        self.unet = unet
        self._frozen = ("unet.encoder",) if freeze_encoder else ()
        if freeze_encoder:
            freeze(unet.encoder)

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's maps the decoder reads (strides 2 to 32; the stride-1 input itself is not kept)."""
        return self.unet.encoder(images)[1:]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """One logit map per image from `encode`'s maps. smp's decoder reads only the shape of the stride-1
        entry (the input), so a zero-stride placeholder stands in for it."""
        b, _, h, w = maps[0].shape
        placeholder = maps[0].new_zeros(()).expand(b, 1, 2 * h, 2 * w)
        return self.unet.segmentation_head(self.unet.decoder([placeholder, *maps]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """One logit map per image, at the input size."""
        return self.unet(images)


class LinearProbe(_KeepsFrozenEval):
    _frozen = ("encoder",)

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = freeze(encoder)
        dim = encoder.out_channels[-1]
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.head = nn.Linear(dim, n_classes)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Global average of the last feature map (C5), (B, C), in fp32 whatever the autocast."""
        return self.encoder(images)[-1].float().mean(dim=(2, 3))

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(images)]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(maps[0])

    def set_standardisation(self, train_features: torch.Tensor) -> None:
        self.mean.copy_(train_features.mean(0))
        self.std.copy_(train_features.std(0, unbiased=False).clamp_min(1e-6))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        # one small linear layer: fp32 always (bf16 would save nothing and round the scores into ties)
        with torch.autocast(features.device.type, enabled=False):
            return self.head((features.float() - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


def _p6p7_in_fp32(channels: int) -> nn.Module:
    """torchvision's RetinaNet P6 / P7 block, computed in fp32 whatever the autocast. Its stride-2 3 x 3 convs
    see a 1 x 1 map at 64 px images (P6 at 32 px), and there oneDNN 3.12's AMX bf16 weight-gradient kernel
    (brgconv_bwd_w) returns garbage for the padding taps, up to 3e38 or NaN (measured: 60 of 200 draws; exact
    in fp32 and on 2 x 2 maps). The maps are a few pixels, so fp32 costs nothing."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    class P6P7(LastLevelP6P7):
        def forward(self, p, c, names):
            x = (p[-1] if self.use_P5 else c[-1]).float()
            with torch.autocast(x.device.type, enabled=False):
                p6 = self.p6(x)
                p7 = self.p7(torch.relu(p6))
            return [*p, p6, p7], [*names, "p6", "p7"]

    return P6P7(channels, channels)


class EncoderFPN(_KeepsFrozenEval):
    """Any smp encoder as a torchvision detection backbone: its stride 8 / 16 / 32 maps through an FPN,
    plus P6 / P7 as RetinaNet expects."""

    def __init__(self, encoder: nn.Module, out_channels: int, freeze_encoder: bool) -> None:
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        super().__init__()
        self.encoder = freeze(encoder) if freeze_encoder else encoder
        self._frozen = ("encoder",) if freeze_encoder else ()
        self.fpn = FeaturePyramidNetwork(list(encoder.out_channels[-3:]), out_channels,
                                         extra_blocks=_p6p7_in_fp32(out_channels))
        self.out_channels = out_channels

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(images)[-3:]

    def decode(self, maps: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(maps)))

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.decode(self.encode(images))


def _retinanet():
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.image_list import ImageList

    class Detector(RetinaNet):
        """torchvision's RetinaNet, split like the other networks: `decode(maps, targets)` runs what follows
        the encoder (FPN, head, anchors, then the loss or the detections). g2d's images are already at the
        detector's size in [0, 1] with mean 0 / sd 1 normalisation, so torchvision's transform is the identity
        and is skipped there."""

        def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
            return self.backbone.encode(images)

        def decode(self, maps: list[torch.Tensor], targets: list[dict] | None = None):
            """The losses given targets, else the detections."""
            heads = self._heads(maps)
            return self.compute_loss(targets, *heads[1:3]) if targets is not None else self._detections(*heads)

        def decode_both(self, maps: list[torch.Tensor], targets: list[dict]):
            """The losses and the detections of one pass through the FPN and head (validation needs both)."""
            heads = self._heads(maps)
            return self.compute_loss(targets, *heads[1:3]), self._detections(*heads)

        def _heads(self, maps: list[torch.Tensor]):
            b, side = len(maps[0]), self.transform.min_size[0]
            features = list(self.backbone.decode(maps).values())
            # boxes and scores in fp32 whatever the autocast: bf16 would round a 128 px coordinate to 0.5 px
            head_outputs = {k: v.float() for k, v in self.head(features).items()}
            canvas = ImageList(maps[0].new_zeros((), dtype=torch.float32).expand(b, 1, side, side),
                               [(side, side)] * b)
            grids = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in features]  # fp32 anchors
            return features, head_outputs, self.anchor_generator(canvas, grids), canvas

        def _detections(self, features, head_outputs, anchors, canvas):
            per_level = [x.size(2) * x.size(3) for x in features]
            per_location = head_outputs["cls_logits"].size(1) // sum(per_level)
            anchors_per_level = [n * per_location for n in per_level]
            split_outputs = {k: list(v.split(anchors_per_level, dim=1)) for k, v in head_outputs.items()}
            split_anchors = [list(a.split(anchors_per_level)) for a in anchors]
            return self.postprocess_detections(split_outputs, split_anchors, canvas.image_sizes)

    return Detector


def build_detector(encoder: nn.Module, n_classes: int, image_size: int, fpn_channels: int, freeze_encoder: bool,
                   score_threshold: float, detections_per_image: int) -> nn.Module:
    """RetinaNet with anchors sized for `image_size` (16 px at stride 8 up to 256 px at P7). Images go in
    as they are ([0, 1], no re-normalisation, no resizing): as the encoder saw them in pre-training."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (16, 32, 64, 128, 256))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    model = _retinanet()(EncoderFPN(encoder, fpn_channels, freeze_encoder), num_classes=n_classes + 1,
                      min_size=image_size, max_size=image_size, image_mean=[0.0], image_std=[1.0],
                      anchor_generator=anchors, score_thresh=score_threshold,
                      detections_per_img=detections_per_image)
    return model
