#!/usr/bin/env bash
# The GPU benchmark: one prepared run for the few minutes a GPU is lent.
#
# On one GPU with the paper profile (real architectures; random weights where the files are absent,
# which costs the same time), after a short warm-up each, it prints images/s for Stage 1, DINOv2
# feature caching, training steps/s at the profile's batch size (5), and evaluation base and
# refined, then extrapolates the seven benchmarks' evaluation time from the refined images/s
# (refined scoring computes the base map too). Every number comes from the per-stage benchmarks
# (bench/label.py, bench/train.py, bench/evaluate.py), whose full output lands in the log folder;
# bench/teacher.py then times the SAM 3 teacher against the DINOv3 student (its own table in teacher.log).
#
#   bench/gpu.sh            # about 6-8 minutes on an H100/H200-class GPU
#   bench/gpu.sh --quick    # under 3 minutes: fewer images and steps
#   bench/gpu.sh --quick --profile demo --device cpu   # a smoke run of the script itself, anywhere
#
# Targets (issue 12, one H100/H200-class GPU): Stage 1 >= 5 images/s, features >= 300 images/s,
# all seven benchmarks base + refined in under 45 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 profile=paper device=cuda dtype=bf16
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --profile) profile="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dtype) dtype="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

PY=${PY:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
LOGS=${BENCH_LOGS:-${OUT:-/tmp}/fmbseg-gpu-bench}
mkdir -p "$LOGS"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$device" == cuda* ]]; then
  "$PY" - <<'EOF' || { echo "bench/gpu.sh: no CUDA device visible to torch (use --device cpu for a smoke run)" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
fi

if (( quick )); then
  label_images=6 feature_images=128 steps=20 eval_images=6
else
  label_images=30 feature_images=1024 steps=100 eval_images=24
fi

run() {  # run NAME CMD...: the command's output into $LOGS/NAME.log, echoed; its wall seconds recorded
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "   ($((SECONDS - t0)) s)"
}

"$PY" - <<EOF | tee "$LOGS/device.log"
import torch
d = torch.device("$device")
name = torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"# device {name}, torch {torch.__version__}, profile $profile, dtype $dtype, quick=$quick")
EOF

run label "$PY" bench/label.py --profile "$profile" --mode fmbseg --images "$label_images" --warmup 1 \
    --device "$device" --dtype "$dtype"
run train "$PY" bench/train.py --profile "$profile" --images "$feature_images" --steps "$steps" \
    --device "$device" --repeats 3
run evaluate "$PY" bench/evaluate.py --profile "$profile" --images "$eval_images" --warmup 1 \
    --device "$device" --dtype "$dtype"
# SAM 3 teacher against the DINOv3 student at 21 / 171 / 847 classes (every prompt decoded unless --quick)
if (( quick )); then teacher_mode=(--probe 1); else teacher_mode=(--full); fi
run teacher "$PY" bench/teacher.py --device "$device" --images 2 "${teacher_mode[@]}" --json "$LOGS/teacher.json"

# The summary, parsed from the logs above.
"$PY" - "$LOGS" <<'EOF'
import re, sys
from pathlib import Path

logs = Path(sys.argv[1])
label = (logs / "label.log").read_text()
train = (logs / "train.log").read_text()
evaluate = (logs / "evaluate.log").read_text()

def grab(pattern, text):
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")

stage1 = grab(r"^fmbseg\s+([0-9.]+)", label)
features = grab(r"feature cache: .*= ([0-9.]+) images/s", train)
steps = grab(r"training: .* ([0-9.]+) steps/s", train)
base = grab(r"^\| base \| ([0-9.]+) \|", evaluate)
refined = grab(r"^\| refined \| ([0-9.]+) \|", evaluate)
# Validation images of the seven benchmarks (PV-21, PV-20, PC-59, CO-80, CS-171, Cityscapes, ADE20K).
sizes = {"pv21": 1449, "pv20": 1449, "pc59": 5104, "co80": 5000, "cs171": 5000, "cityscapes": 500, "ade20k": 2000}
total = sum(sizes.values())
minutes = total / refined / 60 if refined == refined and refined > 0 else float("nan")
rows = [
    ("Stage 1 (label), images/s", stage1, ">= 5"),
    ("DINOv2 feature cache, images/s", features, ">= 300"),
    ("training, steps/s (the profile's batch: 5 for paper)", steps, ""),
    ("evaluation base, images/s", base, ""),
    ("evaluation base + refined, images/s", refined, ""),
    (f"seven benchmarks ({total} images), base + refined, minutes", minutes, "< 45"),
]
print("\n| measure | value | target |\n|---|---:|---|")
for name, value, target in rows:
    print(f"| {name} | {value:.2f} | {target} |")
print("\n(evaluation images are 500x375 PV-21 pictures; Cityscapes' 2048x1024 cost more windows each, "
      "COCO-Stuff's and ADE20K's about the same)")
EOF
