#!/usr/bin/env bash
# One prepared run of the GPU paths on a lent CUDA machine (never part of CI):
#   1. our ViT equals timm's on the GPU (fp32, explicit attention, bf16 drift)  -> gpu_check.md
#   2. ours vs timm throughput, fp32 and bf16 autocast, tiny/small/base           -> bench_vit_gpu.md
#   3. the quickstart through train.py on one GPU with bf16-mixed                 -> quickstart_gpu.json
#   4. vit_small at 224 px with gradual unfreezing, bf16-mixed, through train.py  -> unfreeze_gpu.json
#   5. speed: train.py vs a bare loop, vit_base, bf16-mixed, 224 px, batch 64, model.compile off
#      and on: img/s, data wait, host syncs per step, MFU (model FLOPs/img x img/s / 989 TFLOP/s)
#      -> bench_train_gpu.md; torch.profiler's top operations of each side -> profile/
#   6. a compiled run resumed uncompiled (checkpoints interchangeable), then `melanoma evaluate`
#      and `melanoma predict --device cuda` (auto precision -> bf16) against CPU fp32 -> resume_cli_gpu.json
# Steps run in the order of $STEPS (default: all, the speed steps first). One command may run 10
# minutes: "1 5 6" should take about 6-8 minutes on an H100 (estimate, not yet run), "2 3 4" the rest:
#   STEPS="1 5 6" bash experiments/gpu_check.sh
# Dry run of steps 5 and 6 on a CPU, shrunk (no nvidia-smi, vit_tiny, a few steps):
#   DRY_RUN=1 STEPS="5 6" OUT=/tmp/gpu_dry bash experiments/gpu_check.sh
# Wheels the GPU image lacks (hydra, omegaconf, albumentations, ...) travel in .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
STEPS=${STEPS:-1 5 6 2 3 4}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -d .whl ] && ! python3 -c "import hydra, omegaconf, albumentations" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 WANDB_MODE=disabled MPLBACKEND=Agg PYTHONUNBUFFERED=1
python3 -c "import torch, timm, lightning, hydra, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
gpu=$([ "$DRY_RUN" = 1 ] && echo "CPU dry run" || nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

step1() {
echo "== 1. correctness"
python3 experiments/gpu_check.py --out "$OUT/gpu_check.md"
}

step2() {
echo "== 2. throughput ours vs timm"
python3 experiments/bench_vit.py --device cuda --archs tiny small base --infer-batch 256 --train-batch 64 \
    --reps 3 --threads 8 --out "$OUT/bench_vit_gpu.md" --machine "$gpu (lent), 16 CPU cores"
}

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

step3() {
echo "== 3. quickstart on the GPU, bf16-mixed"
start=$SECONDS
python3 train.py experiment=quickstart trainer=gpu trainer.precision=bf16-mixed logger=csv num_threads=8 \
    hydra.run.dir=/tmp/runs/quickstart paths.data_dir=/tmp/data trainer.enable_progress_bar=false
summarise /tmp/runs/quickstart "$((SECONDS - start))" "$OUT/quickstart_gpu.json"
}

step4() {
echo "== 4. vit_small 224 px, gradual unfreezing, bf16-mixed"
start=$SECONDS
python3 train.py dataset=synthetic dataset.image_size=224 dataset.generate_size=224 dataset.num_workers=8 \
    dataset.batch_size=64 model=vit_small model.pretrained=null callbacks=unfreezing trainer=gpu trainer.precision=bf16-mixed \
    trainer.max_epochs=4 logger=csv num_threads=8 hydra.run.dir=/tmp/runs/unfreeze paths.data_dir=/tmp/data \
    trainer.enable_progress_bar=false
summarise /tmp/runs/unfreeze "$((SECONDS - start))" "$OUT/unfreeze_gpu.json"
cp /tmp/runs/unfreeze/csv/metrics.csv "$OUT/unfreeze_metrics.csv" 2>/dev/null || true
}

if [ "$DRY_RUN" = 1 ]; then
    # shrunk to what a 2-core CPU does in a few minutes; same commands otherwise
    ACCEL=cpu; DEVICE=cpu; MODEL=vit_tiny; PREC=32-true; BATCH=4; WORKERS=1; THREADS=1
    BENCH_STEPS="--warmup 1 --steps 2"; NIMG=60
    SHRINK="model.backbone.kwargs.depth=2 trainer.limit_train_batches=2 trainer.limit_val_batches=2"
else
    ACCEL=gpu; DEVICE=cuda; MODEL=vit_base; PREC=bf16-mixed; BATCH=64; WORKERS=12; THREADS=4
    BENCH_STEPS="--warmup 10 --steps 20"; NIMG=640; SHRINK=""
fi

step5() {
echo "== 5. speed: train.py vs bare loop, $MODEL, $PREC, 224 px, batch $BATCH, compile off/on"
# compile on: the first (warm-up) steps include inductor's compilation, outside the timed window
python3 experiments/bench_train.py --accelerator "$ACCEL" --models "$MODEL" --precisions "$PREC" \
    --compile off on --batch "$BATCH" --workers "$WORKERS" --threads "$THREADS" $BENCH_STEPS --rounds 1 \
    --out "$OUT/bench_train_gpu.md" --profile "$OUT/profile"
}

step6() {
echo "== 6. compiled run resumed uncompiled, then evaluate and predict on $DEVICE"
rm -rf /tmp/runs/resume /tmp/runs/resume2 /tmp/runs/report /tmp/ham_check
python3 -c "import sys; sys.path.insert(0, 'experiments'); from pathlib import Path; import bench_train as b; b.make_images(Path('/tmp/ham_check'), $NIMG)"
common="dataset=ham10000 dataset.root=/tmp/ham_check dataset.image_size=224 dataset.batch_size=$BATCH
    dataset.num_workers=$WORKERS model=$MODEL model.pretrained=null trainer.accelerator=$ACCEL
    trainer.precision=auto logger=csv trainer.enable_progress_bar=false num_threads=$THREADS
    test=false evaluate=false $SHRINK"
python3 train.py $common model.compile=true trainer.max_epochs=1 hydra.run.dir=/tmp/runs/resume
python3 train.py $common model.compile=false trainer.max_epochs=2 hydra.run.dir=/tmp/runs/resume2 \
    ckpt_path=/tmp/runs/resume/checkpoints/last.ckpt
ckpt=/tmp/runs/resume2/checkpoints/last.ckpt
python3 -m melanoma.cli evaluate "$ckpt" dataset=ham10000 dataset.root=/tmp/ham_check \
    dataset.num_workers=$WORKERS --device "$DEVICE" --precision auto --out /tmp/runs/report -q
python3 -m melanoma.cli predict "$ckpt" /tmp/ham_check --device "$DEVICE" --precision auto --out /tmp/runs/pred_dev.csv -q
python3 -m melanoma.cli predict "$ckpt" /tmp/ham_check --device cpu --precision 32-true --out /tmp/runs/pred_cpu.csv -q
python3 - "$OUT/resume_cli_gpu.json" <<'PY'
import json, sys, torch, pandas as pd
first = torch.load("/tmp/runs/resume/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
second = torch.load("/tmp/runs/resume2/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
dev, cpu = pd.read_csv("/tmp/runs/pred_dev.csv"), pd.read_csv("/tmp/runs/pred_cpu.csv")
report = json.load(open("/tmp/runs/report/metrics.json"))
out = {
    "trained precision (resolved auto)": second["melanoma"]["config"]["trainer"]["precision"],
    "steps first / resumed": [first["global_step"], second["global_step"]],
    "resume ok": second["global_step"] == 2 * first["global_step"],
    "same keys, none _orig_mod": list(first["state_dict"]) == list(second["state_dict"])
        and not any("_orig_mod" in k for k in second["state_dict"]),
    "predicted": len(dev), "decision agreement device(auto) vs cpu fp32": float((dev["decision"] == cpu["decision"]).mean()),
    "max |p_mel device - cpu|": float((dev["melanoma_probability"] - cpu["melanoma_probability"]).abs().max()),
    "evaluate n / auroc": [report.get("n"), report.get("auroc")],
}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
PY
}

for s in $STEPS; do
    "step$s" || echo "!! step $s failed (exit $?)"
done
