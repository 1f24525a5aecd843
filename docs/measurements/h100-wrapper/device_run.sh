#!/usr/bin/env bash
# The H100 measurements of docs/results.md (CUDA rows of "Wrapper overhead", CUDA memory, the RL
# loop's speed), as one timeboxed script. Run from the repository root on the GPU machine; results
# go to $WORK and, packed after every step, to $OUT/h100.tar.gz (the device tool returns <= 8 files).
# The machine has PyTorch but no MuJoCo / Gymnasium / tensordict / SB3: they come unpacked from
# .whl/site312.tar.xz (cp312 wheels), EGL from .gl/*.deb (see /work/.library/device/README.md).
set -u
OUT=${OUT:-h100-out}; WORK=${WORK:-/tmp/h100}; mkdir -p "$OUT" "$WORK"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100}
# GPU machine only: dpkg -x unpacks into /
if [ -d .gl ] && command -v nvidia-smi >/dev/null; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
if [ -f .whl/site312.tar.xz ]; then mkdir -p /tmp/site && tar -xJf .whl/site312.tar.xz -C /tmp/site; fi
export PYTHONPATH=/tmp/site:$PWD MUJOCO_GL=egl PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...: one timeboxed step, its output in $WORK/NAME.log
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$WORK/$name.log" 2>&1
    echo "== $name rc=$? at ${SECONDS}s, took $((SECONDS - t0))s" | tee -a "$WORK/summary.txt"
    tail -n 8 "$WORK/$name.log"
    tar -czf "$OUT/h100.tar.gz" -C "$WORK" .
}
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } \
    | tee "$WORK/summary.txt"
run versions 60 $PY -c "import torch, mujoco, gymnasium, tensordict, stable_baselines3, locis_rl; print(torch.__version__, mujoco.__version__, gymnasium.__version__, tensordict.__version__, stable_baselines3.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
run wrapper_sync 130 $PY -m locis_rl.bench wrapper --checkpoint default --device "$DEVICE" --num-envs 1 8 16 \
    --steps "$STEPS" --json "$WORK/wrapper_sync.json"
run wrapper_async 80 $PY -m locis_rl.bench wrapper --checkpoint default --device "$DEVICE" --num-envs 8 16 \
    --vector async --steps "$STEPS" --json "$WORK/wrapper_async.json"
run ppo_loop 70 $PY docs/measurements/h100-wrapper/ppo_loop_speed.py --device "$DEVICE" --timesteps "${PPO_STEPS:-8192}" \
    --json "$WORK/ppo_loop.json"
run memory 100 $PY -m locis_rl.bench memory --checkpoint default --device "$DEVICE" --steps "${MEMORY_STEPS:-6400}" \
    --num-envs 8 --out "$WORK/memory" --json "$WORK/memory.json"
run model 45 $PY -m locis_rl.bench model --presets default --batch-sizes 1 8 16 --device "$DEVICE" --no-rgb \
    --steps 20 --json "$WORK/model.json"
run model_compile 90 $PY -m locis_rl.bench model --presets default --batch-sizes 8 --device "$DEVICE" --no-rgb \
    --compile --steps 20 --json "$WORK/model_compile.json"
