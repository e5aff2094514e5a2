#!/usr/bin/env bash
# Run train.py under torchrun on every local GPU (one process when there is none).
#
#   bash launch.sh --data_dir /data/place_shoe --out_dir out/shoe        # all local GPUs
#   NPROC=2 bash launch.sh --data_dir ... --out_dir ...                  # fewer processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash launch.sh ...   # on each of several nodes
#   bash launch.sh --demo     # tiny model + demo episodes: make them, train, check a held-out episode
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python || command -v python3)}
# torchrun passes these on to the ranks, which finish the step, save and exit 75 (train.py --preempt_signals);
# without SIGUSR1 here (what SLURM's --signal sends by default) torchrun would die of it and save nothing
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

if [ "${1:-}" = "--demo" ]; then
  shift
  [ -f out/demo_data/episode_47.hdf5 ] || $PY demo.py out/demo_data --episodes 48 --seed 0
  [ -f out/tiny-openvla/config.json ] || $PY demo.py --tiny out/tiny-openvla
  rm -rf out/demo
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
  NPROC=${NPROC:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 2)}
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py \
    --vla_path out/tiny-openvla --data_dir out/demo_data --out_dir out/demo \
    --max_steps 500 --lr_decay_step 400 --save_interval 500 --eval_interval 250 --log_interval 25 \
    --num_workers 0 "$@"
  CKPT=out/demo/step_000500
  EPISODE=$($PY -c "import json; print(json.load(open('$CKPT/args.json'))['val_episode_files'][0])")
  $PY infer.py --checkpoint "$CKPT" --episode "$EPISODE" --out out/demo/infer
  $PY plot.py out/demo/infer/report.json
  echo "demo done: checkpoint $CKPT, plot out/demo/infer/plot.png, numbers out/demo/infer/report.json"
  exit 0
fi

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 1)}
if [ "${NNODES:-1}" = 1 ]; then
  RDZV=(--standalone)  # a free local port, no address to configure
else
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "${MASTER_PORT:-29500}")
fi
exec $PY -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" train.py "$@"
