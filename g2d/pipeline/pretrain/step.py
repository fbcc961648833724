"""One pre-training step, shared by the `pretrain` stage and `g2d bench` so the benchmark times the
code that trains: the forward pass under the configured precision, the scaled backward pass, gradient
clipping and the optimizer / scheduler step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2d.config import Compute, Pretrain
from g2d.pipeline import runtime


@dataclass
class Trainer:
    net: torch.nn.Module  # the model, or its DDP / compiled wrapper: called for the losses
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable: list[torch.nn.Parameter]
    dev: torch.device
    precision: str  # bf16 | fp16 | fp32, resolved for the device
    layout: torch.memory_format

    @classmethod
    def build(cls, model: torch.nn.Module, net: torch.nn.Module, recipe: Pretrain, compute: Compute,
              dev: torch.device, schedule) -> Trainer:
        """AdamW over the trainable parameters (after any batch-norm conversion), the schedule, the scaler."""
        trainable = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        precision = runtime.precision(compute.precision, dev)
        return cls(torch.compile(net) if compute.compile else net, optimizer, scheduler,
                   runtime.grad_scaler(dev, precision), trainable, dev, precision, layout(compute))

    def losses(self, batch: dict, recipe: Pretrain, dense_on: bool):
        images = batch["image"].to(self.dev, non_blocking=True).contiguous(memory_format=self.layout)
        with runtime.autocast(self.dev, self.precision):
            return self.net(images, batch["input_ids"].to(self.dev, non_blocking=True),
                            batch["attention_mask"].to(self.dev, non_blocking=True), recipe, dense_on=dense_on)

    def update(self, total: torch.Tensor, grad_clip: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def layout(compute: Compute) -> torch.memory_format:
    return torch.channels_last if compute.channels_last else torch.contiguous_format
