#!/usr/bin/env bash
# Launch spmd_rlhf with torchrun: one node, or several (the same command on every node).
#   launch/torchrun.sh [OVERRIDES...]                 # one node (--standalone), all its GPUs (or NPROC CPU ranks)
#   NNODES=4 RDZV_ENDPOINT=host0:29500 launch/torchrun.sh recipe=grpo_gsm8k model.path=...   # c10d rendezvous
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 launch/torchrun.sh ...                          # static ranks
# Environment (all optional): NPROC (ranks per node; default: GPUs, or 2 on CPU), NNODES, RDZV_ENDPOINT,
# RDZV_ID (default spmd_rlhf: the same on every node), RDZV_BACKEND (c10d), NODE_RANK, MASTER_ADDR,
# MASTER_PORT (29500), PYTHON (default: the checkout's .venv/bin/python made by `make setup`, else python3),
# DRY_RUN=1 (print the command instead of running it), CHECK=0 (skip the configuration check),
# MAX_RESTARTS (default 0): restart all workers after a failure; pair it with trainer.resume=auto and a
# fixed trainer.checkpoint_dir. Restarts need a c10d rendezvous (--standalone or RDZV_ENDPOINT) and
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (set here), or the restarted workers hang on a stale store.
# Everything after the script name goes to `python -m spmd_rlhf.train` (Hydra overrides). The configuration
# is checked once here (`python -m spmd_rlhf.check`) before any rank starts: an error is one line, exit 2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)}
NNODES=${NNODES:-1}

launcher=(--nproc-per-node "$NPROC")
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  launcher+=(--nnodes "$NNODES" --rdzv-backend "${RDZV_BACKEND:-c10d}" --rdzv-endpoint "$RDZV_ENDPOINT"
             --rdzv-id "${RDZV_ID:-spmd_rlhf}")
elif [ "$NNODES" -gt 1 ]; then
  if [ -z "${MASTER_ADDR:-}" ] || [ -z "${NODE_RANK:-}" ]; then
    echo "torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (rendezvous), or MASTER_ADDR=<first node>" \
         "and NODE_RANK=<0..$((NNODES - 1))> on every node" >&2
    exit 2
  fi
  launcher+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
             --master-port "${MASTER_PORT:-29500}")
else
  launcher+=(--standalone)
fi
if [ "${MAX_RESTARTS:-0}" -gt 0 ]; then
  if [ "$NNODES" -gt 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    echo "torchrun.sh: MAX_RESTARTS needs a c10d rendezvous across nodes: set RDZV_ENDPOINT=host:port" >&2
    exit 2
  fi
  launcher+=(--max-restarts "$MAX_RESTARTS")
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi

cmd=("$PYTHON" -m torch.distributed.run "${launcher[@]}" -m spmd_rlhf.train "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if ! "$PYTHON" -c 'import torch, hydra, spmd_rlhf' 2>/dev/null; then
  echo "torchrun.sh: $PYTHON cannot import torch, hydra and spmd_rlhf; activate the environment made by \`make setup\`" \
       "(. .venv/bin/activate) or set PYTHON=.venv/bin/python" >&2
  exit 2
fi
if [ "${CHECK:-1}" != 0 ]; then
  "$PYTHON" -m spmd_rlhf.check --world-size $((NPROC * NNODES)) "$@" || exit $?
fi
exec "${cmd[@]}"
