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
# torchrun reports failed ranks in ~40 lines (a traceback and a table) printed after their one-line error, burying it.
# So torchrun runs inside this Python program (exec'd below: the same process, which signals reach as before), the
# ranks' stderr passes through it, and a failure after a rank printed an error ends with one line for torchrun's
# report and then that error, on the last line. A failure without one (a crash, a signal) keeps the full report.
read -r -d '' TORCHRUN <<'EOF' || true
import os, re, sys, threading
from torch.distributed import run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

terminal = os.dup(2)
sink = open(terminal, "wb", closefd=False)
read_end, write_end = os.pipe()
os.dup2(write_end, 2)  # the ranks inherit it
os.close(write_end)
first_error = []


def relay():
    for line in open(read_end, "rb"):
        sink.write(line)
        sink.flush()
        if not first_error and re.match(rb"(\S+: )?error: ", line):
            first_error.append(line)


relaying = threading.Thread(target=relay, daemon=True)
relaying.start()
failure = None
try:
    run.main(sys.argv[1:])
except ChildFailedError as e:
    failure = e
finally:
    sys.stderr.flush()
    os.dup2(terminal, 2)  # the relay ends once the ranks (and their data workers) have closed theirs too
    relaying.join(timeout=10)
if failure and not first_error:
    raise failure
if failure:
    rank, info = failure.get_first_failure()
    report = f"torchrun: {failure.name} failed (rank {rank}: exit code {info.exitcode}); the ranks' first error:"
    print(report, file=sys.stderr)
    sys.stderr.buffer.write(first_error[0])
    sys.exit(1)
EOF

if [ "${1:-}" = "--demo" ]; then
  shift
  [ -f out/demo_data/episode_47.hdf5 ] || $PY demo.py out/demo_data --episodes 48 --seed 0
  [ -f out/tiny-openvla/config.json ] || $PY demo.py --tiny out/tiny-openvla
  rm -rf out/demo
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
  NPROC=${NPROC:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 2)}
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY -c "$TORCHRUN" --standalone --nproc_per_node "$NPROC" train.py \
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
exec $PY -c "$TORCHRUN" "${RDZV[@]}" --nproc_per_node "$NPROC" train.py "$@"
