#!/usr/bin/env bash
# torchrun wrapper for lcron-train, on one machine or one node of many.
#
#   CONFIG=configs/small-2stage.toml NPROC_PER_NODE=2 launch/run_train.sh [--section.field=value ...]
#   # two nodes: on each, NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> launch/run_train.sh
#
# Environment (defaults): CONFIG (configs/tiny-2stage.toml), NPROC_PER_NODE (1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), LOG_DIR (per-rank log files; default: none, console only),
# MAX_RESTARTS (3: when a rank dies, torchrun restarts the whole group this many times, and the run resumes
# from its newest complete checkpoint), PYTHON (.venv/bin/python if present, else python3).
# Other arguments pass through as config overrides.
# Every log line carries its rank: "[rank R]" from lcron_dist's logger, "[default<local rank>]:" from torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/tiny-2stage.toml}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# One thread pool per rank sized to the node's cores, not every rank using them all.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}

log_args=(--tee 3)
if [[ -n "${LOG_DIR:-}" ]]; then
  mkdir -p "$LOG_DIR"
  log_args+=(--log-dir "$LOG_DIR")
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --node-rank "$NODE_RANK" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-lcron}" \
  --max-restarts "$MAX_RESTARTS" \
  "${log_args[@]}" \
  -m lcron_dist.train --config "$CONFIG" "$@"
