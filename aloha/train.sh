#!/usr/bin/env bash
# The CPU recipe: the tiny twin trained on record.py's demos, for aloha/evaluate.py's closed loop.
#
#   bash aloha/train.sh out/aloha/transfer_cube out/aloha/run            # checkpoints land in OUT_DIR/step_*
#   bash aloha/train.sh DEMOS OUT --max_steps 1000                       # any train.py flag overrides the recipe's
#   VLA_PATH=openvla/openvla-7b bash aloha/train.sh DEMOS OUT --max_steps 20000 --lr 5e-4 --lr_decay_step 16000 \
#       --save_interval 2000 --batch_size 8 --grad_ckpt                   # the 7B model on GPUs (all of them)
#   EVAL_EPISODES=20 bash aloha/train.sh DEMOS OUT                       # and each checkpoint closed loop, as it lands
#
# 10,000 steps at lr 2e-4 (decay at 8,000) on 200 demos: 43 min on 2 CPU cores with bf16 and torch.compile (the CPU
# defaults below), 50/100 closed loop; in float32, eager: 94 min, 50/100 and 45/100 in two runs (docs/simulation.md).
# Twice as long (--max_steps 20000 --lr_decay_step 16000, 89 min): 50/100 again, no better (docs/simulation.md).
# Shorter, in float32 eager: --max_steps 5000 --lr_decay_step 4000: 32/100 (another training seed: 25/100;
# 400 demos: 33/100; lr 5e-4: 28/100; --lora_rank 64: 18/100), 41-45 min. docs/simulation.md has every variation.
#
# No --proprio: with the joint state the policy replays the demonstrations without looking at the cube (in the
# pilot 0 of 20 succeeded); without it the only way to the cube is through the camera.
# A located policy is told where the cube starts instead (record.py's observations/object_xy, a state that says
# nothing about the arms), read at run time from the first frame by aloha/locate.py's CNN (docs/simulation.md):
#   bash aloha/train.sh DEMOS OUT --proprio --state_key observations/object_xy
#   python aloha/locate.py out/aloha/locator.pt && python aloha/evaluate.py --checkpoint OUT/step_010000 \
#       --locator out/aloha/locator.pt
set -euo pipefail
DEMOS=${1:?usage: bash aloha/train.sh DEMOS_DIR OUT_DIR [train.py flags]}
OUT=${2:?usage: bash aloha/train.sh DEMOS_DIR OUT_DIR [train.py flags]}
shift 2
# DEMOS, OUT and a VLA_PATH that is a local directory are the caller's paths: made absolute before the cd to the
# repository (a VLA_PATH that is not a directory here is a Hugging Face Hub id and stays as it is)
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
DEMOS=$(absolute "$DEMOS")
OUT=$(absolute "$OUT")
if [ -n "${VLA_PATH:-}" ] && [ -d "$VLA_PATH" ]; then
  VLA_PATH=$(absolute "$VLA_PATH")
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}

# the recipe holds 2 demos out for validation (or --val_episodes N): with too few the rest would train on next to
# nothing without a word
VAL=2
ARGS=("$@")
for i in "${!ARGS[@]}"; do
  if [ "${ARGS[$i]}" = --val_episodes ]; then VAL=${ARGS[$((i + 1))]:-2}; fi
done
N=$(find "$DEMOS" -maxdepth 1 -name 'episode_*.hdf5' 2>/dev/null | wc -l)
if [ "$N" -le $((2 * VAL)) ]; then
  echo "error: $DEMOS holds $N demos: the recipe holds $VAL out for validation and would train on $((N - VAL))" \
    "(it was measured on 200): record more, or pass --val_episodes 0" >&2
  exit 1
fi

VLA_PATH=${VLA_PATH:-out/tiny-openvla}
if [ "$VLA_PATH" = out/tiny-openvla ] && [ ! -f out/tiny-openvla/config.json ]; then
  $PY demo.py --tiny out/tiny-openvla
fi
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
export NPROC=${NPROC:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 2)}  # 2 CPU processes of one thread each
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# On the CPU the recipe compiles its forward and, where the CPU computes bf16 natively (AVX512-BF16 or AMX), runs the
# frozen base in bf16 under autocast: 1.58x a step together (bench.py --what recipe; compile alone 1.35x; on a CPU
# without native bf16 it would be emulated: unmeasured, so it is left out there); the closed loop did not drop (the
# numbers above). --no-compile or --dtype float32 after OUT_DIR undo them. GPUs keep train.py's defaults (bf16 there
# already; compile unmeasured on a GPU).
CPU_FLAGS=()
if [ "$NGPU" = 0 ]; then
  CPU_FLAGS=(--compile)
  if grep -q -w -e avx512_bf16 -e amx_bf16 /proc/cpuinfo 2>/dev/null; then CPU_FLAGS+=(--dtype bfloat16); fi
fi
# EVAL_EPISODES=N: aloha/evaluate.py --checkpoints --watch beside training, each checkpoint on N unseen seeds as it
# lands (the success curve in OUT/success_curve.json); it shares the CPU with training
if [ -n "${EVAL_EPISODES:-}" ]; then
  $PY aloha/evaluate.py --checkpoints "$OUT" --watch --episodes "$EVAL_EPISODES" --envs "${EVAL_ENVS:-2}" --ensemble \
    > "$OUT.closed_loop.log" 2>&1 &
  echo "closed-loop evaluation of each checkpoint: $OUT.closed_loop.log"
fi
exec bash launch.sh --vla_path "$VLA_PATH" --data_dir "$DEMOS" --out_dir "$OUT" \
  --cameras observations/images/top --instruction "transfer the cube" \
  --max_steps 10000 --lr 2e-4 --lr_decay_step 8000 --save_interval 1000 --eval_interval 1000 --log_interval 50 \
  --val_episodes 2 --attention full --no-image_aug --num_workers 0 "${CPU_FLAGS[@]}" "$@"
