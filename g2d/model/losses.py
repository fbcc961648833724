"""G2D's two losses (global image-report alignment, the dense pretext loss) and the downstream segmentation
loss of the paper's protocol."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to each rank's own rows (DDP negatives);
    the tensor itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # differentiable (its backward sums every rank's gradient for this rank's rows) and traceable by
    # torch.compile, unlike torch.distributed.nn.functional.all_gather
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised embeddings: each image's report is its positive and every
    other report in the (global) batch a negative, and the same from the reports' side."""
    # in fp32 even under bf16 autocast: logits near 1 / tau = 14 cannot be told apart in bf16
    image = F.normalize(gather_with_grad(image).float(), dim=-1)
    text = F.normalize(gather_with_grad(text).float(), dim=-1)
    logits = image @ text.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class DenseLoss(torch.nn.Module):
    """L = 1/2 (soft Dice + BCE) between decoder logits and the pseudo mask (MONAI's DiceCELoss)."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target.float())


class SegmentationLoss(torch.nn.Module):
    """The downstream segmentation loss of MGCA's protocol, which G2D follows:
    `focal_weight` x focal(gamma) - log(soft Dice), the soft Dice taken over the whole batch with smoothing 1
    (MONAI's FocalLoss and DiceLoss)."""

    def __init__(self, focal_weight: float = 10.0, gamma: float = 2.0) -> None:
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss

        self.focal_weight = focal_weight
        self.focal = FocalLoss(gamma=gamma, use_softmax=False)
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        return self.focal_weight * self.focal(logits, target) - torch.log(1 - self.dice(logits, target))


def reconstruction_loss(output: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The reconstruction pretext of the paper's Table 5a: the decoder redraws the image."""
    return F.mse_loss(torch.sigmoid(output.float()), images.float())
