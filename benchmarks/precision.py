"""What bf16 autocast buys on this machine: one fine-tuning step of the default U-Net decoder on a frozen
encoder's maps (forward, MGCA's loss, backward, AdamW), in fp32 and in bf16, per image. `compute.precision:
auto` picks bf16 on CPUs with bf16 instructions; this says whether that pays here.

    python benchmarks/precision.py [--params params.yaml] [--batch 8] [--steps 20]
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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    from g2d.config import load_params
    from g2d.model.losses import SegmentationLoss
    from g2d.model.towers import build_unet
    from g2d.pipeline import runtime

    params = load_params(args.params)
    size = params.finetune.image_size
    torch.manual_seed(0)
    unet = build_unet(params.model).to(memory_format=torch.channels_last)
    images = torch.rand(args.batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(args.batch, 1, size, size) > 0.9).float()
    with torch.no_grad():
        maps = [m.detach() for m in unet.encoder(images)]
    head = [p for n, p in unet.named_parameters() if not n.startswith("encoder.")]
    optimizer = torch.optim.AdamW(head, lr=params.finetune.segmentation.lr)
    loss_fn = SegmentationLoss()
    cpu = torch.device("cpu")

    def step(precision: str) -> None:
        with runtime.autocast(cpu, precision):
            loss = loss_fn(unet.segmentation_head(unet.decoder(maps)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    print(f"bf16 instructions on this CPU: {runtime.cpu_has_bf16()}; auto resolves to "
          f"{runtime.precision('auto', cpu)}; {torch.get_num_threads()} threads, batch {args.batch}, {size} px")
    timings = {}
    for precision in ("fp32", "bf16"):
        for _ in range(3):  # warm-up: oneDNN picks its kernels
            step(precision)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(precision)
        timings[precision] = (time.perf_counter() - start) / (args.steps * args.batch) * 1000
        print(f"{precision}: {timings[precision]:.2f} ms per image per decoder step")
    print(f"bf16 / fp32 speed: {timings['fp32'] / timings['bf16']:.2f}x")


if __name__ == "__main__":
    main()
