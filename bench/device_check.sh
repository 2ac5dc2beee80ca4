#!/usr/bin/env bash
# The accelerator check: one command for a machine with a GPU (or TPU), at
# most ~8 minutes. Writes bench/results/device_check/<date>_<backend>.jsonl
# (one JSON object a line) and prints a Markdown table of it.
#
#   bash bench/device_check.sh            # on the accelerator machine
#   SMOKE=1 bash bench/device_check.sh    # tiny sizes, any machine (CPU: ~3 min)
#
# What it measures (each in its own process, so peak memory is its own):
#   1. environment: jax / jaxlib versions, backend, device kind and count;
#   2. the ResNet-50 train step (configs/cuhk.py's network, random weights),
#      900x1500 canvases, batch 5, float32 and bfloat16: images/s, step
#      time, compile time, device peak memory, compilations (bench/suite_jax.py);
#   3. inference (detect + embed) at batch 8, bfloat16 and float32;
#   4. 200 training steps of configs/cuhk.py's network on the synthetic
#      dataset resized to 900x1500 (train.py itself): the loss must go down
#      and the step must compile once.
# Targets it reports against (one H100-class GPU, bfloat16): >= 150 train
# and >= 200 inference images/s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=tiny H=288 W=480 TRAIN_B=2 INFER_B=2 STEPS=20 RUN_CONFIG=configs/synthetic.py
  RUN_SIZES="--config.data.min_size=288 --config.data.max_size=480"
else
  PRESET=resnet50 H=900 W=1500 TRAIN_B=5 INFER_B=8 STEPS=200 RUN_CONFIG=configs/cuhk.py
  RUN_SIZES="--config.data.min_size=900 --config.data.max_size=1500"
fi
backend=$(python -c "import jax; print(jax.default_backend())")
out_dir=bench/results/device_check
mkdir -p "$out_dir"
stamp=$(date -u +%Y-%m-%dT%H%M)
out="$out_dir/${stamp}_${backend}$([ "${SMOKE:-0}" = 1 ] && echo _smoke).jsonl"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$out"

# Runs a command with a time limit; on failure records what failed and goes on.
measure() {  # name, limit_s, command...
  local name=$1 limit=$2; shift 2
  echo "== $name" >&2
  if timeout "$limit" "$@" > "$work/last.out" 2> "$work/last.err"; then
    tail -n 1 "$work/last.out" | python -c \
      "import json,sys; r=json.load(sys.stdin); r['check']='$name'; print(json.dumps(r))" >> "$out"
  else
    local rc=$?
    tail -n 5 "$work/last.err" >&2
    python -c "import json; print(json.dumps({'check': '$name', 'failed': True, 'rc': $rc}))" >> "$out"
  fi
}

python - >> "$out" <<'EOF'
import json, platform, jax, jaxlib
d = jax.devices()[0]
print(json.dumps({"check": "environment", "jax": jax.__version__,
                  "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
                  "device_kind": d.device_kind, "device_count": jax.device_count(),
                  "python": platform.python_version(), "host": platform.node()}))
EOF

for dtype in bfloat16 float32; do
  measure "train/$dtype" 150 python bench/suite_jax.py train --preset "$PRESET" \
    --height "$H" --width "$W" --batch "$TRAIN_B" --dtype "$dtype" --steps 5
done
for dtype in bfloat16 float32; do
  measure "infer/$dtype" 100 python bench/suite_jax.py infer --preset "$PRESET" \
    --height "$H" --width "$W" --batch "$INFER_B" --dtype "$dtype" --iters 5
done

# 4. A real run through train.py on the synthetic data (generated on first use).
echo "== run/$STEPS steps" >&2
# shellcheck disable=SC2086
if timeout 240 python train.py --config="$RUN_CONFIG" --workdir="$work/run" \
    --config.data.dataset=synthetic --config.data.root="$work/data" \
    --config.model.pretrained= --config.model.dtype=bfloat16 \
    --config.train.num_steps="$STEPS" --config.train.log_every=10 \
    --config.eval.at_end=False --config.eval.every_steps=0 $RUN_SIZES \
    > "$work/run.out" 2> "$work/run.err"; then
  run_rc=0
else
  run_rc=$?
fi
python - "$work/run/history.jsonl" "$run_rc" "$STEPS" >> "$out" <<'EOF'
import json, os, sys
path, rc, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
rows = [r for r in rows if "loss" in r]
res = {"check": f"run/{steps}_steps", "rc": rc, "logged": len(rows)}
if rows:
  k = max(1, len(rows) // 4)
  first = sum(r["loss"] for r in rows[:k]) / k
  last = sum(r["loss"] for r in rows[-k:]) / k
  res.update(first_loss=first, last_loss=last, loss_went_down=last < first,
             step_compilations=rows[-1].get("step_compilations"),
             sec_per_step=rows[-1].get("sec_per_step"),
             images_per_sec=rows[-1].get("images_per_sec"))
print(json.dumps(res))
EOF
[ "$run_rc" = 0 ] || tail -n 5 "$work/run.err" >&2

python bench/device_check_report.py "$out"
echo "results: $out" >&2
