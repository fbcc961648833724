"""The G2D method (Liu et al., NeurIPS 2024, §3), in pure torch.

- `towers.py`: image encoder + U-Net decoder (smp), text encoder (transformers)
- `heads.py`: projections P_v / P_l and the attention pooling whose weights make the pseudo mask
- `pseudo_mask.py`: the parameter-free pseudo segmentation target
- `losses.py`: global alignment (InfoNCE) and the dense loss
- `g2d.py`: the model that ties them together, and one training step's losses
"""
