"""What a pre-trained encoder does without labels: zero-shot classification and phrase grounding (the
paper's Table 2).

- stage.py, the `zeroshot` stage (`g2d zeroshot`): classifies images with prompts alone, writes
  metrics/zeroshot/<task>_<model>.json;
- grounding.py, the `ground` stage (`g2d ground`): heat maps of phrases scored against each finding's
  region, writes metrics/grounding/<task>_<model>.json (an ablation's under metrics/ablations/grounding)
  and the report page reports/grounding/<task>_<model>.png;
- tasks.py: the zero-shot and grounding tasks and the dataset each reads;
- encoders.py: a pre-trained model with both towers (also for `g2d explain` and serving);
- similarity.py: prompts, embeddings and heat maps in the shared space;
- grounding_metrics.py: pointing game, IoU / Dice, contrast-to-noise ratio.
"""
