#!/usr/bin/env bash
# LeRobot's ACT trained by LeRobot's own training command (lerobot-train, lerobot 0.4.4) on a data set written by
# aloha/act/to_lerobot.py, on the CPU, cut at a wall-clock budget: the peer of aloha/train.sh (aloha/act/README.md).
#
#   bash aloha/act/train_act.sh out/act/tc200_lerobot out/act/run                 # 44 minutes, as aloha/train.sh
#   MINUTES=0 bash aloha/act/train_act.sh DATASET OUT --steps=20 --save_freq=10    # no time cut: a step count
#   bash aloha/act/train_act.sh DATASET OUT --policy.optimizer_lr=1e-4             # any lerobot-train flag overrides
#
# Environment: MINUTES (wall-clock budget, default 44: aloha/train.sh's 10,000 steps measured on these 2 cores with its
# CPU defaults, bf16 and compiled, 43 min 14 s; 0 for none), THREADS (torch threads, default 2: the two cores
# aloha/train.sh's two processes take), PRECISION (bf16 or no: accelerate's autocast, which lerobot-train's
# update_policy enters; default bf16, as aloha/train.sh on this CPU; no is ACT's float32), SAVE_FREQ
# (steps between checkpoints, default 50: what the time cut can lose), KEEP_EVERY (older checkpoints kept, as
# pretrained_model only, every this many steps; default 500), LEROBOT_VENV (default /work/lerobot-venv).
# OMP_WAIT_POLICY defaults to PASSIVE: on a loaded machine two spinning OpenMP threads burned 10 CPU s a step
# against 3.4 CPU s passive (aloha/act/README.md has the measurements).
# The time cut stops lerobot-train wherever it is; checkpoints/last is only moved to a checkpoint once it is fully
# written, so it is the last one saved before the cut, at most SAVE_FREQ steps before it, and it keeps its optimizer
# state (lerobot-train --resume could go on from it). A run cut before its first checkpoint is an error.
#
# ACT's sim recipe (Zhao et al. 2023, and LeRobot's ACTConfig defaults, which follow it) spelled out: chunk 100,
# 100 actions executed per chunk (evaluate_act.py --ensemble for ACT's temporal ensembling), KL weight 10,
# dim_model 512, 8 heads, feed-forward 3200, 4 encoder layers, 1 decoder layer (ACT's 7 of which only the first was
# used), latent 32, dropout 0.1, AdamW lr 1e-5 (backbone too), weight decay 1e-4, batch 8, ResNet-18. Deviations:
# the ResNet-18 starts from random weights (pretrained_backbone_weights=null) because no weights can be downloaded
# here (ACT used ImageNet's), and LeRobot keeps its batch norms frozen (FrozenBatchNorm2d), which from scratch means
# no normalization in the backbone at all; images are still normalized with ImageNet's mean and std, as LeRobot
# does by default. No image augmentation (as ACT and aloha/train.sh). One process of THREADS threads, the
# data loader in the main process (num_workers 0, as aloha/train.sh): the video decoding counts in the budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=${1:?usage: bash aloha/act/train_act.sh DATASET_ROOT OUT_DIR [lerobot-train flags]}
OUT=${2:?usage: bash aloha/act/train_act.sh DATASET_ROOT OUT_DIR [lerobot-train flags]}
shift 2
MINUTES=${MINUTES:-44}
THREADS=${THREADS:-2}
SAVE_FREQ=${SAVE_FREQ:-50}
KEEP_EVERY=${KEEP_EVERY:-500}
LEROBOT_VENV=${LEROBOT_VENV:-/work/lerobot-venv}
TRAIN="$LEROBOT_VENV/bin/lerobot-train"
if [ ! -x "$TRAIN" ]; then
  echo "error: $TRAIN not found: create the venv as aloha/act/README.md says, or set LEROBOT_VENV" >&2
  exit 1
fi
if [ ! -f "$DATASET/meta/info.json" ]; then
  echo "error: $DATASET: no meta/info.json, not a LeRobot data set (write one with aloha/act/to_lerobot.py)" >&2
  exit 1
fi
if [ -e "$OUT" ]; then
  echo "error: $OUT exists: lerobot-train would refuse it; pass another OUT_DIR" >&2
  exit 1
fi
# no network here: the data set is local, and nothing may go to the Hugging Face Hub or Weights & Biases
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# lerobot 0.4.4 creates its Accelerator without a precision: accelerate reads this variable
export ACCELERATE_MIXED_PRECISION=${PRECISION:-bf16}
# with a time budget the step count only caps it (ACT's recipe has no learning-rate schedule to fit to it)
STEPS=1000000
if [ "$MINUTES" = 0 ]; then
  STEPS=100000
  CUT=()
else
  CUT=(timeout --signal=TERM --kill-after=60 "${MINUTES}m")
fi
# Checkpoints older than the last are thinned while training runs (each is 600 MB, 400 of them optimizer state):
# every KEEP_EVERY-th step keeps its pretrained_model for a success curve, the others go; the one being written
# (newer than checkpoints/last) is never touched.
thin() {
  local last keep_step ckpt step
  last=$(readlink "$OUT/checkpoints/last" 2>/dev/null) || return 0
  keep_step=$((10#$last))
  for ckpt in "$OUT"/checkpoints/[0-9]*; do
    [ -d "$ckpt" ] || continue
    step=$((10#$(basename "$ckpt")))
    if [ "$step" -lt "$keep_step" ] && [ $((step % KEEP_EVERY)) = 0 ]; then
      rm -rf "$ckpt/training_state"
    elif [ "$step" -lt "$keep_step" ]; then
      rm -rf "$ckpt"
    fi
  done
}
mkdir -p "$(dirname "$OUT")"
# the thinning loop ends with this script, however it ends
(while kill -0 $$ 2>/dev/null; do
  sleep 20
  thin
done) &
THINNER=$!
trap 'kill $THINNER 2>/dev/null' EXIT
START=$(date +%s)
set +e
"${CUT[@]}" "$TRAIN" \
  --dataset.repo_id=nanooft/aloha_transfer_cube --dataset.root="$DATASET" --dataset.video_backend=pyav \
  --policy.type=act --policy.device=cpu --policy.push_to_hub=false \
  --policy.vision_backbone=resnet18 --policy.pretrained_backbone_weights=null \
  --policy.chunk_size=100 --policy.n_action_steps=100 --policy.kl_weight=10 --policy.dim_model=512 \
  --policy.n_heads=8 --policy.dim_feedforward=3200 --policy.n_encoder_layers=4 --policy.n_decoder_layers=1 \
  --policy.latent_dim=32 --policy.dropout=0.1 --policy.use_vae=true \
  --policy.optimizer_lr=1e-5 --policy.optimizer_lr_backbone=1e-5 --policy.optimizer_weight_decay=1e-4 \
  --batch_size=8 --num_workers=0 --steps="$STEPS" --save_freq="$SAVE_FREQ" --log_freq=10 --eval_freq=0 \
  --wandb.enable=false --output_dir="$OUT" "$@"
STATUS=$?
set -e
ELAPSED=$(($(date +%s) - START))
if [ "$STATUS" = 124 ] || [ "$STATUS" = 137 ]; then
  echo "time budget of $MINUTES min reached after $ELAPSED s"
elif [ "$STATUS" != 0 ]; then
  echo "error: lerobot-train exited with status $STATUS after $ELAPSED s" >&2
  exit "$STATUS"
fi
LAST="$OUT/checkpoints/last"
if [ ! -L "$LAST" ]; then
  echo "error: no checkpoint was completed in $ELAPSED s (SAVE_FREQ=$SAVE_FREQ steps): nothing to evaluate" >&2
  exit 1
fi
KEEP=$(readlink "$LAST")
thin
# a checkpoint cut while it was being written is newer than the last one: drop it whole
for ckpt in "$OUT"/checkpoints/[0-9]*; do
  if [ $((10#$(basename "$ckpt"))) -gt $((10#$KEEP)) ]; then
    echo "removing $ckpt, cut while being written"
    rm -rf "$ckpt"
  fi
done
echo "last checkpoint: $OUT/checkpoints/$KEEP ($((10#$KEEP)) steps in $ELAPSED s); kept: $(ls "$OUT/checkpoints" | tr '\n' ' ')"
echo "evaluate: $LEROBOT_VENV/bin/python aloha/act/evaluate_act.py --checkpoint $LAST/pretrained_model"
