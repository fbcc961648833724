"""The results, read back from the metrics files and the tracking store.

- report.py, the `report` stage (`g2d report`): reads metrics/finetune, metrics/study, metrics/zeroshot,
  metrics/grounding and metrics/ablations/grounding; writes reports/results.md (the paper's Tables 1, 2
  and 4), the learning curves (reports/curves/*.csv, reports/learning_curves.png) and, through
  comparisons.py, reports/study.md and its figures (reports/study/);
- comparisons.py: the study, the paper's comparisons with every cell over seeds and every difference
  tested paired; stats.py: its intervals and tests; paper_numbers.py: the paper's own tables;
  grounding_compare.py: two encoders' grounding paired by phrase and seed;
- promotion.py, the `promote` stage (`g2d models promote`): ranks the registered encoder's versions by
  their fine-tuning runs in the tracking store, moves the alias to the best and writes
  reports/model_card.md.

The metrics files are read by g2d/pipeline/metrics_files.py, the one reader the report and the study share.
"""
