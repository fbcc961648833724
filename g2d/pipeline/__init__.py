"""The pipeline: g2d's stages, one package per stage family, and the helpers the families share.

A stage is a module with `run(params, ...)`, which the CLI calls and DVC runs (dvc.yaml); it is the only
place that ties data and model code to tracking. In a family, `stage.py` is the stage named after it.

Stage families:
- datasets/: SynthCXR rendered from the embedded sources (`synth`), and a downloaded dataset imported
  (`g2d data import`) with its contact sheet;
- pretrain/: G2D pre-training (`pretrain`, `pretrain-global`, the study's ablations), its training step,
  its evaluation, where a run reads and writes, and `g2d bench`, which times the step;
- finetune/: the downstream tasks (`finetune`, `transfer`, `ablation-finetune`, `g2d evaluate`): where the
  encoder comes from, the fit loop, the frozen encoder's features, and the segmentation, classification
  (linear probe) and detection families;
- zeroshot/: zero-shot classification (`zeroshot`) and phrase grounding (`ground`), with their tasks,
  prompts and heat maps, the pre-trained encoders they load and the grounding scores;
- study/: the results read back: `report` (reports/results.md), the study (reports/study.md) with its
  statistics, the paper's numbers and the grounding comparison, and `promote` (the champion, its card).

Shared by the families: distributed.py (torchrun), runtime.py (device, seeds, precision, checkpoints, stop
requests), preflight.py (the checks before a job's first step), figures.py, model_files.py (a model
folder: write, read, locate), metrics_files.py (the metrics JSON files DVC tracks: names, writing,
reading), downstream_metrics.py (Dice, mAP, AUC: fine-tuning and zero-shot classification) and export.py
(`g2d models export`).

Package __init__ files hold a docstring only: import the module you need (`from g2d.pipeline.finetune
import stage`), so reading one small module of a family (its paths, its ablations) never imports torch.
"""
