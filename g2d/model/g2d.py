"""The G2D model: one image tower (a U-Net's encoder), one text tower, projections into a shared
d-dimensional space, attention pooling for the global image embedding, and the U-Net decoder for
the dense pretext task.

    image  -> encoder -> C5 map -> P_v -> attention pooling -> image embedding --\\
    report -> BERT -> P_l -> [CLS] ---------------------------> report embedding -+-> InfoNCE
    attention weights -> pseudo mask (no parameters, no gradient) ------------------\\
    encoder features -> U-Net decoder -> logits ------------------------------------+-> 1/2 (Dice + BCE)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from g2d.config import Model, Pretrain
from g2d.model.heads import AttentionPool, ProjectionMap, ProjectionTokens
from g2d.model.losses import DenseLoss, info_nce, reconstruction_loss
from g2d.model.pseudo_mask import pseudo_mask
from g2d.model.towers import TextTower, build_unet


@dataclass
class ImageOutput:
    embedding: torch.Tensor  # (B, d), pooled
    attention: torch.Tensor  # (B, heads, h, w), the pooling query's weights over the C5 map
    projected_map: torch.Tensor  # (B, d, h, w), P_v of C5 (pool.local_embeddings of it: grounding)
    features: list[torch.Tensor]  # encoder pyramid, input of the decoder


@dataclass
class StepLosses:
    total: torch.Tensor
    global_: torch.Tensor
    dense: torch.Tensor
    target: torch.Tensor | None  # the pseudo mask (or image) the dense loss used
    image: ImageOutput


class G2D(nn.Module):
    def __init__(self, cfg: Model, vocab_size: int, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg)
        c5 = self.unet.encoder.out_channels[-1]
        grid = max(image_size // cfg.output_stride, 1)  # the encoder's last map
        self.proj_image = ProjectionMap(c5, cfg.embed_dim)
        self.pool = AttentionPool(cfg.embed_dim, cfg.heads, grid)
        self.text = TextTower(cfg, vocab_size)
        self.proj_text = ProjectionTokens(self.text.hidden_size, cfg.embed_dim)
        self.dense_loss = DenseLoss()

    # ------------------------------------------------------------------ towers

    def encode_image(self, images: torch.Tensor) -> ImageOutput:
        features = self.unet.encoder(images)
        projected = self.proj_image(features[-1])
        embedding, attention = self.pool(projected)
        return ImageOutput(embedding, attention, projected, features)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The projected [CLS] token, (B, d)."""
        out = self.text(input_ids, attention_mask)
        return self.proj_text(out.tokens, out.attention_mask)[:, 0]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """U-Net decoder + segmentation head: one logit map at the input size."""
        return self.unet.segmentation_head(self.unet.decoder(features))

    def checkpoint_towers(self) -> None:
        """Gradient checkpointing of both towers: the encoder's stages and the text tower's trainable
        layers keep no activations and are recomputed in the backward pass."""
        for name, stage in self.unet.encoder.named_children():
            if name.startswith("layer"):  # ResNet-style stages; the stem is cheap to keep
                _checkpointed(stage)
        self.text.checkpoint_layers()

    # ------------------------------------------------------------------ training objective

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: Pretrain,
                dense_on: bool, generator: torch.Generator | None = None) -> StepLosses:
        """A training step's losses (what DistributedDataParallel wraps)."""
        return self.losses(images, input_ids, attention_mask, cfg, dense_on, generator)

    def losses(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: Pretrain,
               dense_on: bool, generator: torch.Generator | None = None) -> StepLosses:
        """L = L_global + L_dense; the dense term is zero during the warm-up and for dense = none."""
        image = self.encode_image(images)
        text = self.encode_text(input_ids, attention_mask)
        global_ = info_nce(image.embedding, text, cfg.temperature)
        dense = global_.new_zeros(())
        target = None
        if cfg.dense != "none" and dense_on:
            logits = self.decode(image.features)
            if cfg.dense == "pseudo_seg":
                target = pseudo_mask(image.attention, images, cfg.pseudo_mask, generator)
                dense = self.dense_loss(logits, target)
            else:
                target = images
                dense = reconstruction_loss(logits, images)
        return StepLosses(global_ + dense, global_, dense, target, image)


def _checkpointed(module: nn.Module) -> None:
    """Recompute `module` in the backward pass instead of keeping its activations (same state_dict keys)."""
    from torch.utils.checkpoint import checkpoint

    inner = module.forward

    def forward(*args):
        if module.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False)
        return inner(*args)

    module.forward = forward
