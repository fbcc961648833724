"""Typed parameters: pydantic models mirroring params.yaml, the single source of parameters.

`load_params(path, overrides)` is the only way the rest of g2d gets a config: the YAML file
and every `--set a.b=value` override are validated by the same models, unknown keys are
refused, and errors name the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from g2d.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Strict):
    """Folders relative to the project root (absolute paths are allowed too)."""

    sources: str = Field("data", description="fetched source files, tracked by data.dvc")
    synthcxr: str = Field("datasets/synthcxr", description="rendered SynthCXR (a DVC stage output)")
    metrics: str = Field("metrics", description="small JSON metrics that DVC tracks")
    models: str = Field("models", description="checkpoints and exported models (DVC stage outputs)")
    packs: str = Field("packs", description="image packs for pre-training (pretrain.pack), rebuilt when stale")


class Tracking(Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; null = sqlite mlflow.db at the project root. "
        "MLFLOW_TRACKING_URI overrides it."
    )


class Preflight(Strict):
    """Checks `g2d pretrain` and `g2d train` run before the first step (g2d/pipeline/preflight.py), so a bad
    input fails in seconds rather than hours into a run."""

    decode_sample: int = Field(32, ge=0, description="manifest rows whose files are validated (image decodes, "
                               "masks binary and the image's size, boxes inside); every row's text is checked")
    verify_data: bool = Field(True, description="compare the data with dvc.lock / its .dvc file, else with the "
                              "sha256 in its dataset.json")
    hash_all_below_gb: float = Field(2.0, ge=0, description="datasets up to this size are hashed in full, larger "
                                     "ones by a sample of files")
    hash_sample: int = Field(256, ge=0, description="files hashed from a larger dataset (besides its manifest, "
                             "dataset.json and fraction files)")
    min_free_gb: float = Field(1.0, ge=0, description="free disk needed where models, checkpoints and a local "
                               "MLflow store are written")


class SetSize(Strict):
    count: int = Field(ge=4, description="images to render")
    positive_fraction: float = Field(0.5, gt=0, lt=1, description="share of images with a finding")


class Splits(Strict):
    """Patient-level split shares and the nested label fractions drawn from train."""

    val: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)
    fractions: tuple[float, ...] = Field((0.01, 0.1, 1.0), min_length=1)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        _in_unit_interval(v)
        if list(v) != sorted(set(v)):
            raise ValueError(f"fractions must be increasing and distinct, got {list(v)}")
        return v


def _decimal_fractions(v):
    ints = [f for f in v if isinstance(f, int) and not isinstance(f, bool)] if isinstance(v, list | tuple) else []
    if ints:
        raise ValueError(f"write fractions as decimals ({ints[0]}.0, not {ints[0]}): DVC names each stage and "
                         "metrics file after the value as written")
    return v


def _in_unit_interval(fractions: tuple[float, ...]) -> tuple[float, ...]:
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"every fraction must be in (0, 1], got {f}")
    return fractions


class Synth(Strict):
    """Rendering of the embedded SynthCXR dataset."""

    seed: int = Field(1234, ge=0)
    image_size: int = Field(224, ge=32, le=1024)
    max_reports: int | None = Field(
        None, ge=8, description="cap on IU reports rendered for pre-training; null = all (~3,900)"
    )
    pneumothorax: SetSize = SetSize(count=1000)
    opacity: SetSize = SetSize(count=1000)
    splits: Splits = Splits()
    contact_sheet: int = Field(12, ge=1, le=64, description="examples drawn on the contact sheet")
    workers: int = Field(0, ge=0, description="render processes; 0 = all cores. Does not change the output")


class PseudoMask(Strict):
    """How the pseudo segmentation target is made from the attention pooling (paper §3.2, Table 8)."""

    threshold: float | Literal["median"] = Field(
        0.85, description="per-image quantile of in-body attention: pixels above it are foreground; 'median' = 0.5"
    )
    aggregate_heads: bool = Field(True, description="mean over heads; false = the first head alone")
    body_mask: bool = Field(True, description="zero attention outside the body (Otsu threshold of the image)")
    smooth: bool = Field(True, description="joint bilateral smoothing of the binary mask, guided by the image")
    shuffle: bool = Field(False, description="ablation: pair each image with another image's mask")
    smooth_kernel: int = Field(5, ge=3, le=15, description="bilateral window (odd)")
    smooth_sigma_space: float = Field(1.5, gt=0)
    smooth_sigma_range: float = Field(0.1, gt=0, description="on image intensities in [0, 1]")

    @field_validator("threshold")
    @classmethod
    def _quantile(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"threshold must be a quantile in (0, 1) or 'median', got {v}")
        return v

    @field_validator("smooth_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"smooth_kernel must be odd, got {v}")
        return v


class Model(Strict):
    """The G2D networks. Paper profile: resnet50, Bio_ClinicalBERT with 9 of 12 layers frozen, 224 px."""

    encoder: str = Field("resnet18", description="segmentation_models_pytorch encoder name (paper: resnet50)")
    encoder_weights: str | None = Field(None, description="null = random init; 'imagenet' needs internet")
    decoder_channels: tuple[int, ...] = Field((128, 64, 32, 16, 8), min_length=5, max_length=5)
    output_stride: Literal[16, 32] = Field(32, description="the encoder's stride at its last map, the attention "
                                           "grid's cell: 16 dilates the last stage (a 2x finer grid at the same "
                                           "input size)")
    text_model: str = Field(
        "minilm", description="'minilm' = the packaged all-MiniLM-L6-v2; 'tiny' = a 2-layer BERT built from config "
        "(tests); 'bert-base-config' = a randomly initialised BERT-base (12 x 768) built from config (benchmarks); "
        "or a Hugging Face name / local path, e.g. emilyalsentzer/Bio_ClinicalBERT"
    )
    text_dropout: float | None = Field(None, ge=0, lt=1, description="dropout of the text tower; null = the "
                                       "model's own (0.1 for BERTs). 0 makes ranks of a DDP run draw no noise")
    text_frozen_layers: int = Field(4, ge=0, description="first N transformer layers (and the embeddings) frozen")
    max_length: int = Field(128, ge=8, le=512, description="report tokens kept (truncation)")
    embed_dim: int = Field(128, ge=8, description="d, the shared embedding size")
    heads: int = Field(4, ge=1, description="attention-pooling heads (paper: 3)")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> Model:
        if self.embed_dim % self.heads:
            raise ValueError(f"heads = {self.heads} does not divide embed_dim = {self.embed_dim}; pick heads that "
                             f"divide {self.embed_dim} or an embed_dim divisible by {self.heads}")
        return self


class Compute(Strict):
    """How training uses the hardware. None of it changes the method; precision and memory layout change
    results only at float-rounding level."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with bf16 instructions (AVX512-BF16, AMX), "
        "else fp32; fp16 adds a GradScaler")
    channels_last: bool = Field(True, description="NHWC memory layout for the image tower (faster convolutions)")
    compile: bool = Field(False, description="torch.compile the model (minutes of compilation, then faster steps)")
    grad_checkpointing: bool = Field(False, description="recompute both towers' activations in the backward pass: "
                                     "less memory for about a third more compute")
    text_length_groups: int = Field(4, ge=1, description="the text tower runs a batch's reports sorted by length "
                                    "in this many groups, each padded to its own longest (1: one batch padded to "
                                    "its longest); the outputs are the same")


class Pretrain(Strict):
    """G2D pre-training (paper §4: AdamW, warm-up + cosine schedule)."""

    dataset: str | None = Field(None, description="image-report dataset folder (an import, e.g. data/mimic-cxr); "
                                "null = SynthCXR's pre-training set")
    image_size: int = Field(128, ge=32, le=1024, description="training resolution (paper: 224)")
    batch_size: int = Field(32, ge=2)
    epochs: int = Field(4, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (smoke runs); null = all epochs")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    temperature: float = Field(0.07, gt=0)
    dense: Literal["pseudo_seg", "reconstruction", "none"] = Field(
        "pseudo_seg", description="dense pretext task; none = global alignment only (ConVIRT / CLIP-style)"
    )
    dense_warmup_steps: int = Field(30, ge=0, description="steps of global alignment alone before the dense loss")
    pseudo_mask: PseudoMask = PseudoMask()
    augment: bool = Field(True, description="random resized crop and small rotation of training images")
    pack: bool = Field(False, description="read images from a pack (the manifest's images resized once to "
                       "image_size, one .npy file under paths.packs; built on first use) instead of decoding "
                       "PNGs: about 4x faster reads, the same pixels")
    num_workers: int = Field(0, ge=0, description="dataloader processes (they also tokenise)")
    log_every: int = Field(10, ge=1, description="steps between logged losses")
    grid_every: int = Field(85, ge=1, description="steps between logged attention / pseudo-mask grids")
    grid_images: int = Field(6, ge=1, le=32)
    eval_images: int = Field(256, ge=8, description="val images for the per-epoch pseudo-mask IoU")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    register_as: str = Field("g2d-encoder", description="registered model name")
    name: str = Field("pretrain", pattern=r"^[A-Za-z0-9_-]+$",
                      description="output names: models/<name>, metrics/<name>.json (e.g. pretrain-global)")


def _multiple_of_32(v: int) -> int:
    if v % 32:
        raise ValueError(f"must be a multiple of 32 (the encoder stride), got {v}; e.g. {v // 32 * 32 or 32}")
    return v


# Downstream tasks, named after the datasets of the paper's tables; g2d/data/tasks.py says what each is.
TASK_NAMES = ("siim-seg", "rsna-seg", "chexpert-cls", "rsna-cls", "covidx-cls", "rsna-det", "object-cxr-det")
Task = Literal["siim-seg", "rsna-seg", "chexpert-cls", "rsna-cls", "covidx-cls", "rsna-det", "object-cxr-det"]
SegmentationTask = Literal["siim-seg", "rsna-seg"]  # the tasks a U-Net decoder can transfer to


class Recipe(Strict):
    """MGCA's downstream recipe, which G2D follows: AdamW at a constant rate for at most `epochs` passes over the train
    set (the same for every label fraction, so the number of steps grows with the data), validated after every
    epoch, stopped after `patience` epochs without a better `monitor`; the weights of the best epoch are tested.
    `epoch_length: full-set` makes the budget one of steps instead, the same for every fraction."""

    batch_size: int = Field(8, ge=1)
    epochs: int = Field(50, ge=1, description="at most; the same for every label fraction")
    epoch_length: Literal["pass", "full-set"] = Field(
        "pass", description="pass: an epoch is one pass over the cell's train images (MGCA's; a 1% cell takes 1/100 "
        "of the 100% cell's steps); full-set: as many steps as one pass over the whole train split, the cell's "
        "images passed over again in fresh orders (every label fraction gets the 100% cell's steps per epoch)")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    patience: int = Field(10, ge=1, description="epochs without a better monitored value before stopping")
    monitor: Literal["loss", "score"] = Field("loss", description="what early stopping and the kept weights follow: "
                                              "the val loss (lower is better) or the val score (higher is better)")


class Augment(Strict):
    """MGCA's train augmentation for segmentation (albumentations' ShiftScaleRotate), as MONAI's RandAffine: the
    image and its mask move together."""

    p: float = Field(0.5, ge=0, le=1, description="probability that a train image is transformed; 0 = none")
    shift: float = Field(0.0625, ge=0, lt=0.5, description="largest shift, as a share of the side")
    scale: float = Field(0.1, ge=0, lt=1, description="largest change of scale, either way")
    rotate: float = Field(10.0, ge=0, le=180, description="largest rotation, degrees")
    views: int | None = Field(
        4, ge=1, description="null: every image is transformed afresh at every step (MGCA; a frozen encoder then runs "
        "on every batch); K: K transformed views of each train image are drawn once (seeded by params `seed`) and, "
        "with a frozen encoder, encoded once; each epoch a sample is its view with probability p")


class Segmentation(Recipe):
    freeze_encoder: bool = Field(True, description="the paper's protocol: only the decoder trains")
    transfer: Literal["encoder", "encoder_decoder"] = Field(
        "encoder", description="what the pre-trained model gives: the encoder, or the encoder and its U-Net decoder"
    )
    head: Literal["fresh", "pretrained"] = Field(
        "fresh", description="with transfer encoder_decoder: the 1-channel head on the decoder starts fresh at `prior` "
        "(fresh), or keeps the pre-training head that draws pseudo masks on every image (pretrained)")
    threshold: float = Field(0.5, gt=0, lt=1, description="on the sigmoid, for Dice")
    prior: float = Field(0.01, gt=0, lt=1, description="foreground probability a fresh head starts at (its bias, "
                         "RetinaNet's prior): predictions start empty, not half foreground")
    focal_weight: float = Field(10.0, ge=0, description="loss = focal_weight x focal - log(soft Dice) (MGCA)")
    focal_gamma: float = Field(2.0, ge=0)
    balanced: tuple[SegmentationTask, ...] = Field(
        ("siim-seg",), description="tasks whose train set is every positive of the label fraction plus as many "
        "negatives drawn with the run's seed (MGCA's SIIM protocol); val and test keep their prevalence")
    augment: Augment = Augment()


class Probe(Recipe):
    """Linear probe: one linear layer on the frozen encoder's pooled last feature map."""

    batch_size: int = Field(48, ge=1)
    standardise: bool = Field(True, description="standardise the features by their train mean and sd (g2d; MGCA "
                              "feeds them as they are)")


class Detection(Recipe):
    """torchvision RetinaNet on the encoder's last three feature maps with an FPN (MGCA: YOLOv3, early stopping and
    the kept weights by val mAP)."""

    batch_size: int = Field(16, ge=1)
    monitor: Literal["loss", "score"] = "score"
    freeze_encoder: bool = Field(True, description="the paper's protocol: the pre-trained backbone stays fixed")
    fpn_channels: int = Field(128, ge=8)
    score_threshold: float = Field(0.05, ge=0, lt=1, description="detections kept for mAP")
    detections_per_image: int = Field(20, ge=1)


class Finetune(Strict):
    """`g2d train`: one task and one initialisation, at one or more label fractions and seeds (cells)."""

    task: Task = Field("siim-seg", description="default --task")
    init: str = Field("g2d", description="default --init: a name in `inits`, a model folder / checkpoint path, a "
                      "registered model (models:/NAME/latest, NAME@ALIAS) or 'random'")
    inits: dict[str, str] = Field(
        {"g2d": "models/pretrain", "global": "models/pretrain-global", "random": "random"},
        description="short names for --init (the finetune matrix's inits)",
    )
    datasets: dict[Task, str] = Field({}, description="task -> dataset folder; absent = the SynthCXR default")
    image_size: int = Field(128, ge=32, le=1024, description="input size (the pre-training size)")
    overlays: int = Field(8, ge=1, le=32, description="test images drawn with their predictions")
    feature_cache_gb: float = Field(8.0, ge=0, description="a frozen encoder's features are computed once per run "
                                    "when they fit in this much memory; otherwise the encoder runs on every batch")
    segmentation: Segmentation = Segmentation(weight_decay=0.05)
    probe: Probe = Probe()
    detection: Detection = Detection()

    @field_validator("image_size")
    @classmethod
    def _stride(cls, v: int) -> int:
        return _multiple_of_32(v)


# Zero-shot tasks (g2d zeroshot) and grounding tasks (g2d ground); g2d/pipeline/zeroshot/tasks.py says what each reads.
ZeroshotTask = Literal["synthcxr", "siim", "rsna", "chexpert-5x200", "chestxray14"]
GroundingTask = Literal["synthcxr", "siim", "rsna", "ms-cxr"]
FINDING = "{finding}"


class Grounding(Strict):
    """`g2d ground`: the prompt's similarity with every location of the last feature map, scored against the
    finding's mask (pointing game, IoU and Dice after binarising, contrast-to-noise ratio)."""

    task: GroundingTask = Field("synthcxr", description="default --task")
    thresholds: tuple[float, ...] = Field(
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95), min_length=1,
        description="candidates for binarising the [0, 1]-scaled heat map; the best val Dice is used on test")
    examples: int = Field(12, ge=1, le=48, description="image / phrase / heat map / truth panels on the report page")

    @field_validator("thresholds")
    @classmethod
    def _open_unit(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in v if not 0 < t < 1]
        if bad:
            raise ValueError(f"thresholds must lie in (0, 1), got {bad}")
        return tuple(sorted(set(v)))


class Zeroshot(Strict):
    """`g2d zeroshot` and `g2d ground`: the pre-trained towers used without labels (paper Table 2)."""

    task: ZeroshotTask = Field("synthcxr", description="default --task of g2d zeroshot")
    datasets: dict[str, str] = Field({}, description="zero-shot / grounding task -> dataset folder; absent = its "
                                     "SynthCXR set")
    phrases: dict[str, str] = Field(
        {"device": "medical device", "edema": "pulmonary edema", "effusion": "pleural effusion",
         "granuloma": "calcified granuloma", "opacity": "lung opacity", "scar": "scarring"},
        description="label column or finding -> the words prompts use (absent: the name, '_' as spaces)")
    positive: tuple[str, ...] = Field(("{finding}", "there is {finding}", "findings consistent with {finding}"),
                                      min_length=1, description="templates of the positive prompt")
    negative: tuple[str, ...] = Field(("no {finding}", "there is no {finding}", "no evidence of {finding}"),
                                      min_length=1, description="templates of the negative prompt")
    ensemble: bool = Field(True, description="average every template's embedding (false: the first template only)")
    split: Literal["val", "test"] = Field("test", description="split that is scored")
    batch_size: int = Field(64, ge=1)
    grounding: Grounding = Grounding()

    @field_validator("positive", "negative")
    @classmethod
    def _one_slot(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in v if t.count(FINDING) != 1]
        if bad:
            raise ValueError(f"each template needs {FINDING} exactly once, e.g. 'no {FINDING}'; got {bad}")
        return v

    @field_validator("datasets")
    @classmethod
    def _known_tasks(cls, v: dict[str, str]) -> dict[str, str]:
        known = set(ZeroshotTask.__args__) | set(GroundingTask.__args__)
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"unknown task(s) {bad}; zero-shot and grounding tasks are {sorted(known)}")
        return v


class Matrix(Strict):
    """The DVC matrices (dvc.yaml reads these lists): finetune = tasks x fractions x inits; zeroshot and ground
    score each of `encoders`."""

    tasks: tuple[Task, ...] = Field(("siim-seg", "rsna-seg", "chexpert-cls", "rsna-det"), min_length=1)
    fractions: tuple[float, ...] = Field((0.01, 0.1, 1.0), min_length=1)
    inits: tuple[str, ...] = Field(("g2d", "global", "random"), min_length=1)
    encoders: tuple[str, ...] = Field(("g2d", "global"), min_length=1,
                                      description="pre-trained encoders the zeroshot / ground stages score")
    seeds: tuple[int, ...] = Field((42, 43, 44), min_length=1,
                                   description="fine-tuning seeds: every cell of the matrices runs once per seed")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {list(v)}")
        return v

    @field_validator("fractions", mode="before")
    @classmethod
    def _written_as_floats(cls, v):
        return _decimal_fractions(v)

    @field_validator("fractions")
    @classmethod
    def _in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return _in_unit_interval(v)


VARIANT_NAME = r"^[A-Za-z0-9_-]+$"
TRANSFER_VARIANT = "encoder-decoder"  # the `transfer` stage's --variant (metrics/study/<task>_<frac>_encoder-decoder_*)
REFERENCE = "g2d"  # the ablation every other one is compared with: pseudo segmentation, everything on


def _check_overrides(sets: tuple[str, ...], where: str) -> tuple[str, ...]:
    """An ablation changes how a model is trained, never where files go or the study itself."""
    bad = [t for t in sets if "=" not in t or t.split("=", 1)[0].split(".")[0] not in ("seed", "model", "compute",
                                                                                        "pretrain")]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is not a KEY=VALUE override of seed, model, compute or pretrain "
                         "(e.g. pretrain.pseudo_mask.threshold=0.75)")
    return sets


class Study(Strict):
    """The paper's ablations (README: Study): pre-training variants, each fine-tuned with every seed.

    A variant is a list of `--set` overrides of its pre-training, applied on top of `budget` (what every
    ablation's pre-training changes from `pretrain`, so the whole study fits a small machine; the reference
    variant `g2d` is the same budget with nothing else changed)."""

    variants: tuple[str, ...] = Field((), description="the ablations dvc repro pre-trains and fine-tunes "
                                      "(names in `ablations`; [] runs none)")
    ablations: dict[str, tuple[str, ...]] = Field({}, description="variant name -> --set overrides")
    budget: tuple[str, ...] = Field((), description="--set overrides every ablation's pre-training shares")
    tasks: tuple[Task, ...] = Field(("siim-seg",), min_length=1, description="each variant is fine-tuned on these")
    fractions: tuple[float, ...] = Field((0.01,), min_length=1, description="... at these label fractions")
    transfer: Literal["encoder", "encoder_decoder"] = Field("encoder_decoder", description="segmentation transfer "
                                                             "of the ablations' fine-tuning")
    transfer_tasks: tuple[SegmentationTask, ...] = Field(("siim-seg",), description="segmentation tasks of "
                                                         "matrix.tasks fine-tuned with encoder + decoder transfer too, "
                                                         "at matrix.fractions")
    grounding_pair: tuple[str, str] = Field(("g2d", "dense-none"), description="two ablations compared on phrase "
                                            "grounding, paired by phrase and pre-training seed (first minus second)")
    grounding_seeds: tuple[int, ...] = Field((), description="more pre-training seeds of grounding_pair's variants "
                                             "(beyond `seed`), each pre-trained and grounded by `dvc repro`")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of every interval")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the paired tests")
    resamples: int = Field(9999, ge=99, description="bootstrap resamples")

    @model_validator(mode="after")
    def _pair_is_known(self) -> Study:
        unknown = [v for v in self.grounding_pair if v not in self.ablations]
        if self.ablations and unknown:
            raise ValueError(f"grounding_pair names {unknown}, not in study.ablations ({', '.join(self.ablations)})")
        if len(set(self.grounding_seeds)) != len(self.grounding_seeds):
            raise ValueError(f"grounding_seeds {list(self.grounding_seeds)} repeats a seed")
        return self

    @field_validator("ablations")
    @classmethod
    def _names_and_overrides(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for name, sets in v.items():
            if not re.match(VARIANT_NAME, name):
                raise ValueError(f"ablation name {name!r}: use letters, digits, '-' and '_' (it names files and "
                                 "DVC stages)")
            if name == TRANSFER_VARIANT:
                raise ValueError(f"ablation name {name!r} is the transfer stage's row; pick another name")
            _check_overrides(sets, f"ablation {name!r}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget_overrides(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_overrides(v, "study.budget")

    @field_validator("fractions", mode="before")
    @classmethod
    def _written_as_floats(cls, v):
        return _decimal_fractions(v)

    @field_validator("fractions")
    @classmethod
    def _in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return _in_unit_interval(v)

    @model_validator(mode="after")
    def _variants_defined(self) -> Study:
        unknown = [n for n in self.variants if n not in self.ablations]
        if unknown:
            raise ValueError(f"study.variants {unknown} are not names in study.ablations "
                             f"({', '.join(self.ablations) or 'none defined'})")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"study.variants lists a name twice: {list(self.variants)}")
        if self.variants and REFERENCE not in self.variants:
            raise ValueError(f"study.variants {list(self.variants)}: add {REFERENCE!r}, the reference every "
                             "ablation is compared with")
        return self


class Promote(Strict):
    """`g2d models promote` without arguments (the `promote` stage): which registered version gets the alias."""

    model: str = Field("g2d-encoder", description="the registered model whose versions compete")
    alias: str = Field("champion", description="the alias the winner gets")
    task: Task = Field("siim-seg", description="ranked by fine-tuning on this task ...")
    frac: float = Field(0.01, gt=0, le=1, description="... at this label fraction ...")
    score: Literal["val_best", "score"] = Field("val_best", description="... by the mean over seeds of the best "
                                                "validation score (val_best; the test score would select on test)")
    min_seeds: int = Field(3, ge=1, description="versions fine-tuned with fewer seeds do not compete")


Uncertainty = Literal["ones", "zeros", "keep"]


class Importing(Strict):
    """`g2d data import`: turning a downloaded dataset into a g2d dataset folder."""

    image_size: int = Field(512, ge=32, le=4096, description="longest side of the stored copies (never upscaled)")
    workers: int = Field(0, ge=0, description="decoding processes, 0 = all cores (never changes the output)")
    shard_size: int = Field(1000, ge=1, description="images per shard folder and per resume checkpoint")
    max_failures: float = Field(0.01, ge=0, le=1, description="share of listed images that may fail to decode "
                                "(each is listed in import_report.json) before the import fails")
    seed: int = Field(42, ge=0, description="seed of the nested label fractions")
    fractions: tuple[float, ...] = Field((0.01, 0.1, 1.0), min_length=1, description="nested label fractions")
    uncertain: dict[str, Uncertainty] = Field(
        {"atelectasis": "ones", "edema": "ones", "effusion": "ones", "cardiomegaly": "zeros",
         "consolidation": "zeros"},
        description="CheXpert / MIMIC-CXR uncertain (-1) labels: ones, zeros or keep (left out of losses); "
        "labels not named are kept")

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return Splits._fractions_in_range(v)


class Params(Strict):
    seed: int = Field(42, ge=0, description="global seed of the training stages")
    paths: Paths = Paths()
    tracking: Tracking = Tracking()
    preflight: Preflight = Preflight()
    synth: Synth = Synth()
    model: Model = Model()
    compute: Compute = Compute()
    pretrain: Pretrain = Pretrain()
    finetune: Finetune = Finetune()
    matrix: Matrix = Matrix()
    zeroshot: Zeroshot = Zeroshot()
    study: Study = Study()
    promote: Promote = Promote()
    importing: Importing = Importing()

    @model_validator(mode="after")
    def _matrix_inits_named(self) -> Params:
        stride, size = self.model.output_stride, self.pretrain.image_size
        if size % stride:  # a multiple of model.output_stride (the pre-training size, checked here: it needs both)
            raise ValueError(f"pretrain.image_size = {size} is invalid: must be a multiple of {stride} "
                             f"(model.output_stride, the encoder's stride); e.g. {size // stride * stride or stride}"
                             + (" or model.output_stride=16" if stride == 32 and size % 16 == 0 else ""))
        for key in ("inits", "encoders"):
            unknown = [i for i in getattr(self.matrix, key) if i not in self.finetune.inits]
            if unknown:
                raise ValueError(f"matrix.{key} {unknown} are not names in finetune.inits "
                                 f"({', '.join(self.finetune.inits)}); add them there or use those names")
        if self.promote.min_seeds > len(self.matrix.seeds):
            raise ValueError(f"promote.min_seeds = {self.promote.min_seeds} but matrix.seeds has "
                             f"{len(self.matrix.seeds)}: no version could qualify; lower it or add seeds")
        if self.promote.task not in self.matrix.tasks or self.promote.frac not in self.matrix.fractions:
            raise ValueError(f"promote ranks by {self.promote.task} at {self.promote.frac:g} of the labels, which "
                             f"the matrix does not run (matrix.tasks {list(self.matrix.tasks)}, matrix.fractions "
                             f"{list(self.matrix.fractions)}); pick a cell of the matrix")
        off = [t for t in self.study.transfer_tasks if t not in self.matrix.tasks]
        if off:
            raise ValueError(f"study.transfer_tasks {off} are not in matrix.tasks {list(self.matrix.tasks)}: the "
                             "encoder + decoder row is compared with the matrix's encoder-only runs; add them there")
        untrained = [i for i in self.matrix.encoders if self.finetune.inits[i] == "random"]
        if untrained:
            raise ValueError(f"matrix.encoders {untrained} name a random init: zero-shot needs a pre-trained encoder")
        return self


# ---------------------------------------------------------------- loading and overrides


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at `loc` (the parent of an unknown key)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Params, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{source}: unknown key '{key}': {hint}allowed here: {', '.join(allowed)}"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a rule across keys of one section (or of the whole file)
        return f"{source}: {key}: {msg}" if key else f"{source}: {msg}"
    return f"{source}: {key} = {value!r} is invalid: {msg}"


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = [_format_error(err, source) for err in e.errors()]
        raise ConfigError("; ".join(lines)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value). The value is read as JSON (numbers, true / false, null,
    lists), otherwise kept as text: YAML 1.1 would turn `064` into 52 and `no` into False, and
    `none` must stay the word (pretrain.dense=none)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. synth.image_size=64")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    if isinstance(parsed, str) and parsed.strip() == "~":  # YAML's null; 'none' stays text (pretrain.dense=none)
        parsed = None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                prefix = ".".join(keys[: i + 1])
                raise ConfigError(f"--set {text!r}: '{prefix}' is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (pass --params FILE, e.g. params.tiny.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    source = str(path) + (" with --set overrides" if overrides else "")
    return validate(raw, source)


def resolve_path(root: Path, path: str) -> Path:
    """A `paths.*` entry made absolute against the project root."""
    p = Path(path)
    return p if p.is_absolute() else root / p


def to_dict(params: BaseModel) -> dict[str, Any]:
    """Plain, YAML-safe dict of the effective config (tuples become lists)."""
    return params.model_dump(mode="json")


def dump_yaml(params: BaseModel, path: Path, sections: tuple[str, ...] | None = None) -> Path:
    """The effective config as YAML; with `sections`, only those (a stage's own params, so that another
    stage's params never change, and re-run, this stage's output)."""
    data = to_dict(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: data[k] for k in sections} if sections else data, sort_keys=False))
    return path
