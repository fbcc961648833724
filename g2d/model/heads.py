"""Projections to the shared space (d = 128) and the attention pooling of the image map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionMap(nn.Module):
    """P_v: 1x1 conv -> BatchNorm (affine=False) -> ReLU -> 1x1 conv, on the last feature map."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 1), nn.BatchNorm2d(in_dim, affine=False), nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, out_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ProjectionTokens(nn.Module):
    """P_l: the same head on token features. Only real tokens enter BatchNorm's statistics, so the
    batch's padding (which depends on the longest report) cannot shift them."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.bn = nn.BatchNorm1d(in_dim, affine=False)
        self.fc2 = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()
        flat = self.fc2(F.relu(self.bn(self.fc1(tokens[keep]))))
        out = flat.new_zeros(*tokens.shape[:2], flat.shape[-1])
        out[keep] = flat
        return out


class AttentionPool(nn.Module):
    """CLIP-style attention pooling: the query is the mean token, keys / values are the mean and
    every pixel token, all with a learned positional embedding. Returns the pooled embedding and the
    per-head attention of the query over the pixels, (B, heads, H, W): the source of the pseudo mask."""

    def __init__(self, dim: int, heads: int, grid: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pooling: d = {dim} is not divisible by heads = {heads}")
        self.heads = heads
        self.grid = grid
        self.positional = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def _positions(self, h: int, w: int) -> torch.Tensor:
        """The positional embedding, resized when the map is not the grid it was made for."""
        mean_pos, pix = self.positional[:1], self.positional[1:]
        if (h, w) != (self.grid, self.grid):
            pix = pix.T.reshape(1, -1, self.grid, self.grid)
            pix = F.interpolate(pix, size=(h, w), mode="bicubic", align_corners=False).reshape(-1, h * w).T
        return torch.cat([mean_pos, pix])

    def local_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) -> (B, d, H, W): each location in the shared space, as the pooling would carry it
        if it attended to that location alone (its value and output projections, with its position).
        The pooled embedding is the attention-weighted mean of these (per head), so a prompt can be
        compared with every location: zero-shot grounding (MaskCLIP's reading of CLIP's pooling)."""
        b, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self._positions(h, w)[1:]
        values = F.linear(tokens, self.attn.in_proj_weight[2 * d:], self.attn.in_proj_bias[2 * d:])
        return self.attn.out_proj(values).transpose(1, 2).reshape(b, d, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, d)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self._positions(h, w)
        pooled, weights = self.attn(tokens[:, :1], tokens, tokens, need_weights=True, average_attn_weights=False)
        per_head = weights[:, :, 0, 1:].reshape(b, self.heads, h, w)  # drop the mean token's own weight
        return pooled[:, 0], per_head
