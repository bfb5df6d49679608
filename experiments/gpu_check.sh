#!/usr/bin/env bash
# One prepared run of the GPU paths on a lent CUDA machine (never part of CI):
#   1. our ViT equals timm's on the GPU (fp32, explicit attention, bf16 drift)  -> gpu_check.md
#   2. ours vs timm throughput, fp32 and bf16 autocast, tiny/small/base           -> bench_vit_gpu.md
#   3. the quickstart through train.py on one GPU with bf16-mixed                 -> quickstart_gpu.json
#   4. vit_small at 224 px with gradual unfreezing, bf16-mixed, through train.py  -> unfreeze_gpu.json
# Wheels the GPU image lacks (hydra, omegaconf, albumentations, ...) travel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -c "import torch, timm, lightning, hydra, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

echo "== 1. correctness"
python3 experiments/gpu_check.py --out "$OUT/gpu_check.md"

echo "== 2. throughput ours vs timm"
python3 experiments/bench_vit.py --device cuda --archs tiny small base --infer-batch 256 --train-batch 64 \
    --reps 3 --threads 8 --out "$OUT/bench_vit_gpu.md" --machine "$gpu (lent), 16 CPU cores"

summarise() {  # run folder -> one JSON with wall time and the test metrics
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys, pathlib
run, seconds, out = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
report = run / "report" / "metrics.json"
tests = sorted(run.glob("test/metrics.json"))
data = {"wall_s": seconds,
        "report": json.loads(report.read_text()) if report.exists() else None,
        "test_results": json.loads(tests[0].read_text()) if tests else None}
pathlib.Path(out).write_text(json.dumps(data, indent=1))
print(json.dumps(data)[:1500])
PY
}

echo "== 3. quickstart on the GPU, bf16-mixed"
start=$SECONDS
python3 train.py experiment=quickstart trainer=gpu logger=csv num_threads=8 \
    hydra.run.dir=/tmp/runs/quickstart paths.data_dir=/tmp/data trainer.enable_progress_bar=false
summarise /tmp/runs/quickstart "$((SECONDS - start))" "$OUT/quickstart_gpu.json"

echo "== 4. vit_small 224 px, gradual unfreezing, bf16-mixed"
start=$SECONDS
python3 train.py dataset=synthetic dataset.image_size=224 dataset.generate_size=224 dataset.num_workers=8 \
    dataset.batch_size=64 model=vit_small model.pretrained=null callbacks=unfreezing trainer=gpu \
    trainer.max_epochs=4 logger=csv num_threads=8 hydra.run.dir=/tmp/runs/unfreeze paths.data_dir=/tmp/data \
    trainer.enable_progress_bar=false
summarise /tmp/runs/unfreeze "$((SECONDS - start))" "$OUT/unfreeze_gpu.json"
cp /tmp/runs/unfreeze/csv/metrics.csv "$OUT/unfreeze_metrics.csv" 2>/dev/null || true
