"""G2D pre-training: an image tower and a text tower aligned globally (InfoNCE) and densely (pseudo
segmentation from the attention pooling's maps).

- stage.py, the `pretrain` stage (`g2d pretrain`): reads the pre-training manifest (datasets/synthcxr/
  pretrain or `pretrain.dataset`), writes the model folder (models/<name>), its checkpoints and
  metrics/<name>.json, and registers the model (`g2d-encoder`);
- step.py: one training step, shared with bench.py (`g2d bench`, which times it);
- evaluation.py: zero-shot retrieval on val and how well the pseudo masks cover the rendered findings;
- paths.py: where a run reads and writes, from params alone;
- ablations.py: the study's variants of pre-training (`g2d pretrain --variant`), written under
  models/ablations and metrics/ablations.
"""
