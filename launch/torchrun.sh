#!/usr/bin/env bash
# Launch spmd_rlhf with torchrun on one node, or on several with a rendezvous endpoint.
#   launch/torchrun.sh [ARGS...]                         # one node, all its GPUs (or NPROC CPU ranks)
#   NNODES=4 NODE_RANK=$i RDZV_ENDPOINT=host0:29500 launch/torchrun.sh recipe=grpo_gsm8k model.path=...
set -euo pipefail
NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}"
  exec python3 -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-spmd_rlhf}" \
    -m spmd_rlhf.train "$@"
fi
exec python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m spmd_rlhf.train "$@"
