"""What bf16 autocast buys on this machine: one fine-tuning step on a frozen encoder's maps (forward, loss,
backward, AdamW), in fp32 and in bf16, per image, of the default U-Net decoder (MGCA's loss, batch 8) and of the
RetinaNet detector (FPN, heads, torchvision's losses, batch 16). `compute.precision: auto` picks bf16 on CPUs
with bf16 instructions; this says whether that pays here, and what an image-epoch of each family costs.

    python benchmarks/precision.py [--params params.yaml] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _segmentation(params, size: int):
    """The default U-Net decoder on a frozen encoder's maps, MGCA's loss: (the network, its loss, the batch)."""
    from g2d.model.losses import SegmentationLoss
    from g2d.model.towers import build_unet

    batch = params.finetune.segmentation.batch_size
    unet = build_unet(params.model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        maps = [m.detach() for m in unet.encoder(_images(batch, size))]
    masks, loss_fn = (torch.rand(batch, 1, size, size) > 0.9).float(), SegmentationLoss()
    return unet, lambda: loss_fn(unet.segmentation_head(unet.decoder(maps)), masks), batch


def _detection(params, size: int):
    """RetinaNet (FPN, heads, torchvision's losses) on a frozen encoder's maps: (the network, its loss, the batch)."""
    from g2d.model.towers import build_unet
    from g2d.model.transfer import build_detector

    d = params.finetune.detection
    net = build_detector(build_unet(params.model).encoder, 1, size, d.fpn_channels, True, d.score_threshold,
                         d.detections_per_image).train()
    with torch.no_grad():
        maps = [m.detach() for m in net.encode(_images(d.batch_size, size))]
    box = torch.tensor([[20.0, 30.0, 60.0, 90.0]])
    targets = [{"boxes": box[: i % 2], "labels": torch.ones(i % 2, dtype=torch.long)} for i in range(d.batch_size)]
    return net, lambda: sum(net.decode(maps, targets).values()), d.batch_size


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from g2d.config import load_params
    from g2d.pipeline import runtime

    params = load_params(args.params)
    size = params.finetune.image_size
    cpu = torch.device("cpu")
    print(f"bf16 instructions on this CPU: {runtime.cpu_has_bf16()}; auto resolves to "
          f"{runtime.precision('auto', cpu)}; {torch.get_num_threads()} threads, {size} px")
    for family, build in (("segmentation", _segmentation), ("detection", _detection)):
        torch.manual_seed(0)
        net, loss, batch = build(params, size)
        optimizer = torch.optim.AdamW([p for n, p in net.named_parameters()
                                       if p.requires_grad and "encoder." not in n], lr=1e-4)
        timings = {}
        for precision in ("fp32", "bf16"):
            for i in range(3 + args.steps):  # 3 warm-up steps: oneDNN picks its kernels
                if i == 3:
                    start = time.perf_counter()
                with runtime.autocast(cpu, precision):
                    value = loss()
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            timings[precision] = (time.perf_counter() - start) / (args.steps * batch) * 1000
        print(f"{family} (batch {batch}): fp32 {timings['fp32']:.2f}, bf16 {timings['bf16']:.2f} ms per image per "
              f"step; bf16 / fp32 speed {timings['fp32'] / timings['bf16']:.2f}x")


if __name__ == "__main__":
    main()
