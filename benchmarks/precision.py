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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from g2d.config import load_params
    from g2d.model.losses import SegmentationLoss
    from g2d.model.towers import build_unet
    from g2d.model.transfer import build_detector
    from g2d.pipeline import runtime

    params = load_params(args.params)
    size, ft = params.finetune.image_size, params.finetune
    cpu = torch.device("cpu")
    print(f"bf16 instructions on this CPU: {runtime.cpu_has_bf16()}; auto resolves to "
          f"{runtime.precision('auto', cpu)}; {torch.get_num_threads()} threads, {size} px")
    for family, batch in (("segmentation", ft.segmentation.batch_size), ("detection", ft.detection.batch_size)):
        torch.manual_seed(0)
        unet = build_unet(params.model).to(memory_format=torch.channels_last)
        images = torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
        if family == "segmentation":
            net, masks, loss_fn = unet, (torch.rand(batch, 1, size, size) > 0.9).float(), SegmentationLoss()
            with torch.no_grad():
                maps = [m.detach() for m in unet.encoder(images)]

            def loss(net=net, maps=maps, masks=masks, loss_fn=loss_fn):
                return loss_fn(net.segmentation_head(net.decoder(maps)), masks)
        else:
            d = ft.detection
            net = build_detector(unet.encoder, 1, size, d.fpn_channels, True, d.score_threshold,
                                 d.detections_per_image).train()
            with torch.no_grad():
                maps = [m.detach() for m in net.encode(images)]
            box = torch.tensor([[20.0, 30.0, 60.0, 90.0]])
            targets = [{"boxes": box[: i % 2], "labels": torch.ones(i % 2, dtype=torch.long)} for i in range(batch)]

            def loss(net=net, maps=maps, targets=targets):
                return sum(net.decode(maps, targets).values())
        trained = [p for n, p in net.named_parameters() if p.requires_grad and "encoder." not in n]
        optimizer = torch.optim.AdamW(trained, lr=1e-4)

        def step(precision: str, loss=loss, optimizer=optimizer) -> None:
            with runtime.autocast(cpu, precision):
                value = loss()
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()

        timings = {}
        for precision in ("fp32", "bf16"):
            for _ in range(3):  # warm-up: oneDNN picks its kernels
                step(precision)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(precision)
            timings[precision] = (time.perf_counter() - start) / (args.steps * batch) * 1000
        print(f"{family} (batch {batch}): fp32 {timings['fp32']:.2f}, bf16 {timings['bf16']:.2f} ms per image per "
              f"step; bf16 / fp32 speed {timings['fp32'] / timings['bf16']:.2f}x")

if __name__ == "__main__":
    main()
