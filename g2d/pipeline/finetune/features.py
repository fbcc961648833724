"""A frozen encoder is a fixed function of the image, so fine-tuning computes its maps once and trains every
head of that encoder (every label fraction, every seed) on them, instead of re-running the encoder at every
step of every cell.

Maps are computed in fixed chunks of a whole split (rows 0-63, 64-127, ...), only the chunks a run touches and
each once, so an image's maps never depend on which other images a run uses: `g2d train` on one cell and the
grouped stage on many compute the same bytes. The cache holds one encoder at a time (keyed by the sha256 of its
weights) and is skipped, the encoder then running on every batch, when the maps would not fit in
`finetune.feature_cache_gb`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from g2d.data.labelled import LabelledSplit

CHUNK = 64

Maps = list[torch.Tensor]


def encoder_digest(encoder: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Encoded:
    """The encoder's maps of one stack of images, by row: cached chunk by chunk, or computed per call."""

    def __init__(self, encode: Callable[[torch.Tensor], Maps], images: torch.Tensor, cached: bool) -> None:
        self.encode, self.images, self.cached = encode, images, cached
        self.store: Maps | None = None
        self.done: set[int] = set()

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> Maps:
        if not self.cached:
            return [m.detach() for m in self.encode(self.images[rows.to(self.images.device)])]
        for chunk in sorted(set((rows // CHUNK).tolist()) - self.done):
            maps = self.encode(self.images[chunk * CHUNK:(chunk + 1) * CHUNK])
            if self.store is None:
                self.store = [m.new_empty((len(self.images), *m.shape[1:])) for m in maps]
            for full, m in zip(self.store, maps, strict=True):
                full[chunk * CHUNK:chunk * CHUNK + len(m)] = m
            self.done.add(chunk)
        return [full[rows.to(full.device)] for full in self.store]

    def all(self) -> Maps:
        return self(torch.arange(len(self.images)))


class FeatureCache:
    """One process's cache: `encoded(...)` returns the same `Encoded` for the same encoder weights and images."""

    def __init__(self, budget_gb: float) -> None:
        self.budget = budget_gb * 1e9
        self.digest: str | None = None
        self.entries: dict[str, Encoded] = {}

    def fits(self, encode: Callable[[torch.Tensor], Maps], sample: torch.Tensor, images: int) -> bool:
        """Whether the maps of `images` images (like `sample`) fit in the budget."""
        with torch.no_grad():
            per_image = sum(m[0].numel() * m.element_size() for m in encode(sample[:1]))
        return per_image * images <= self.budget

    def encoded(self, encoder: nn.Module, encode: Callable[[torch.Tensor], Maps], key: str,
                images: torch.Tensor, cached: bool) -> Encoded:
        if not cached:
            return Encoded(encode, images, cached=False)
        digest = encoder_digest(encoder)
        if digest != self.digest:  # another encoder: its maps replace the last one's
            self.digest, self.entries = digest, {}
        if key not in self.entries:
            self.entries[key] = Encoded(encode, images, cached=True)
        return self.entries[key]

    @property
    def nbytes(self) -> int:
        return sum(sum(m.numel() * m.element_size() for m in e.store) for e in self.entries.values() if e.store)


class Head(nn.Module):
    """What trains: `net.decode` on maps, or `net.decode(net.encode(images))` when the encoder trains too. One
    module, so DDP can wrap it and reach every trainable parameter."""

    def __init__(self, net: nn.Module, encodes: bool) -> None:
        super().__init__()
        self.net, self.encodes = net, encodes

    def forward(self, inputs, *args):
        return self.net.decode(self.net.encode(inputs) if self.encodes else inputs, *args)


def gather(sources: list[Callable[[torch.Tensor], list[torch.Tensor]]], view: torch.Tensor,
           rows: torch.Tensor) -> list[torch.Tensor]:
    """Row i of the batch from source view[i] (row rows[i] of it): the mixed views of one batch."""
    out: list[torch.Tensor] | None = None
    for v in view.unique().tolist():
        sel = torch.nonzero(view == v).flatten()
        parts = sources[v](rows[sel])
        if out is None:
            out = [p.new_empty((len(rows), *p.shape[1:])) for p in parts]
        for o, p in zip(out, parts, strict=True):
            o[sel.to(o.device)] = p
    return out


def view_choice(n: int, views: int, p: float, seed: int, epoch: int) -> torch.Tensor:
    """Which copy of each of the n train rows an epoch uses: 0 (the image itself) or, with probability p, one of
    the `views` transformed copies at random; a function of (seed, epoch) alone, so the same on every rank."""
    if views == 0 or p == 0:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    transformed = torch.rand(n, generator=g) < p
    return torch.where(transformed, torch.randint(1, views + 1, (n,), generator=g), 0)


@dataclass
class Inputs:
    """What the cells of one encoder train, validate and test on."""

    views: list[LabelledSplit]  # the whole train split, then its transformed copies (segmentation's views)
    val: LabelledSplit | None  # rank 0 only
    test: LabelledSplit | None
    maps: list[Encoded] | None = None  # the frozen encoder's maps of each view; None: the encoder trains
    val_maps: Encoded | None = None
    test_maps: Encoded | None = None

    @property
    def cached(self) -> bool:
        return bool(self.maps) and self.maps[0].cached


def inputs(net: nn.Module, encoder: nn.Module, views: list[LabelledSplit], val: LabelledSplit | None,
           test: LabelledSplit | None, frozen: bool, cache: FeatureCache) -> Inputs:
    """The splits with the maps of `net.encode` when the encoder is frozen: cached when they fit."""
    if not frozen:
        return Inputs(views, val, test)
    splits = {f"train-view{v}": s for v, s in enumerate(views)} | {"val": val, "test": test}
    total = sum(len(s) for s in splits.values() if s is not None)
    cached = cache.fits(net.encode, views[0].images, total)
    enc = {k: cache.encoded(encoder, net.encode, k, s.images, cached) if s is not None else None
           for k, s in splits.items()}
    return Inputs(views, val, test, [enc[f"train-view{v}"] for v in range(len(views))], enc["val"], enc["test"])
