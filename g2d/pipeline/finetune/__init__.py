"""Fine-tuning: what a pre-trained encoder is worth on the downstream tasks with 1%, 10% and 100% of the
labels.

- stage.py, the `finetune` stage (`g2d train`; also `transfer` and `ablation-finetune`) and `g2d
  evaluate`: reads a task's dataset and an encoder (initialisation.py: a name, a folder, a checkpoint or a
  registered model), writes metrics/finetune/<task>/<init>/ (a study variant's metrics/study/<task>/
  <variant>/) and registers each model as `g2d-<task>`;
- fit.py: the training loop every task family shares (early stopping, the best epoch kept, torchrun);
- features.py: a frozen encoder's maps, computed once per image and shared by every cell;
- segmentation.py, classification.py (linear probe), detection.py: the three task families, each with the
  same functions: `wrap` (the network around a U-Net), `fit`, `evaluate` and `figure`.

Their scores are g2d/pipeline/downstream_metrics.py's (shared with zero-shot classification).
"""
