#!/usr/bin/env bash
# One end-to-end check of a GPU host, for a machine lent for a few minutes: what
# `trainfleet capability` detects, then a real receiver and one worker on loopback train the
# example transformer on CUDA (a job that requires CUDA and 1 GiB of VRAM; 30 epochs, with
# checkpoint uploads on), and the job, its metrics (the device it trained on) and its artifact
# are printed.
#
#   scripts/check-gpu.sh          # needs torch with CUDA in .venv (or $PYTHON)
#   scripts/check-gpu.sh --cpu    # the same fleet on a host without CUDA: the job may run on CPU
#
# Exits non-zero when the job does not complete, or (without --cpu) when it did not train on
# CUDA. Everything lives in a temp dir, removed at the end (KEEP=1 keeps it, with the
# receiver's log); the receiver is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TF=(env "PYTHONPATH=$PWD/src" "$PYTHON" -m trainfleet)
cuda=true
[ "${1:-}" = "--cpu" ] && cuda=false

work=$(mktemp -d)
receiver_pid=""
cleanup() {
  if [ -n "$receiver_pid" ]; then kill "$receiver_pid" 2>/dev/null || true; wait "$receiver_pid" 2>/dev/null || true; fi
  if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "== trainfleet capability"
"${TF[@]}" capability
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())' || true
if [ $cuda = true ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "FAIL: torch sees no CUDA here (no torch, a CPU build, or no GPU); --cpu runs the fleet without it"
  exit 1
fi

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$PYTHON" -c 'import secrets; print(secrets.token_hex(16))' > "$work/operator.token"
cat > "$work/manifest.toml" <<EOF
schema_version = 1
name = "gpu-check"

[trainer]
command = ["{python}", "examples/trainer/run.py", "--model", "{model}", "--mode", "{mode}",
           "--seed", "{seed}", "--hyper", "{hyper_json}", "--out", "{output_dir}",
           "--checkpoint-dir", "{checkpoint_dir}", "--resume-from", "{resume_from}"]
modes = ["realistic"]

[defaults]
checkpoint_interval_s = 2

[models.transformer]
hyper = { epochs = "int", batch_size = "int", lr = "float" }

[[jobs]]
name = "transformer-gpu-check"
model = "transformer"
mode = "realistic"
hyper = { epochs = 30, batch_size = 64 }
seed = 0
require_cuda = $cuda
min_vram_gib = $([ $cuda = true ] && echo 1 || echo 0)
EOF

echo "== receiver on $url"
"${TF[@]}" receiver --manifest "$work/manifest.toml" --state-dir "$work/receiver" \
  --port "$port" --operator-token-file "$work/operator.token" > "$work/receiver.log" 2>&1 &
receiver_pid=$!
for _ in $(seq 100); do
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('$url/v1/health', timeout=1)" 2>/dev/null && break
  sleep 0.2
done

echo "== worker (one job)"
start=$(date +%s)
timeout 600 "${TF[@]}" worker --receiver "$url" --workdir "$PWD" --state-dir "$work/worker" \
  --once --heartbeat-interval 2 --poll-interval 1 || echo "worker exited with $?"
echo "worker took $(( $(date +%s) - start )) s"

export TRAINFLEET_RECEIVER="$url" TRAINFLEET_OPERATOR_TOKEN="$(cat "$work/operator.token")"
echo "== the job"
"${TF[@]}" show transformer-gpu-check
"${TF[@]}" models --kind checkpoint || true
"${TF[@]}" pull transformer-gpu-check -o "$work/pulled" --extract
metrics=$(find "$work/pulled" -name metrics.json | head -1)
echo "== metrics.json"; cat "$metrics"; echo
device=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['device'])" "$metrics")
if [ $cuda = true ] && [ "${device%%:*}" != cuda ]; then
  echo "FAIL: trained on $device, not CUDA"; exit 1
fi
echo "OK: transformer trained on $device end to end"
