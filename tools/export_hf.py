"""Turn a training checkpoint into a Hugging Face model directory that transformers and vLLM load.

    python tools/export_hf.py outputs/run/checkpoints/step_00000120 exported/   # one step folder
    python tools/export_hf.py outputs/run/checkpoints exported/ --dtype bfloat16  # the one `latest` names

Reads only the actor's model weights from the DCP files, in one process on the CPU, whatever the
number of ranks that saved them (no process group). Writes ``config.json`` and the tokenizer's
files (from the step folder's ``hf/``) and the weights as safetensors through ``save_pretrained``,
which leaves out tied weights (``lm_head.weight`` when ``tie_word_embeddings``) the way transformers
expects them, and shards models past its size limit. Weights stay fp32 unless ``--dtype`` says
otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from spmd_rlhf.trainer.checkpoint import load_model_weights
from spmd_rlhf.trainer.checkpoint_files import HF_DIR, CheckpointError, is_complete, newest_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_step_folder(checkpoint: str) -> str:
    """``checkpoint`` itself if it is a step folder, else the newest complete one inside it."""
    if is_complete(checkpoint):
        return checkpoint
    found = newest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else None
    if found is None:
        raise CheckpointError(f"{checkpoint} is neither a complete step folder nor a directory holding one; "
                              "pass a checkpoints/step_XXXXXXXX folder")
    return found


def _tie_check(weights: dict[str, torch.Tensor], tied: dict[str, str], step_folder: str) -> None:
    """Tied weights were saved once per name; they must agree before one of them is dropped."""
    for name, source in tied.items():
        if name in weights and source in weights and not torch.equal(weights[name], weights[source]):
            raise CheckpointError(f"{step_folder}: {name} and {source} differ although the config ties them "
                                  "(tie_word_embeddings); fix hf/config.json")


def export_hf(checkpoint: str, out: str, component: str = "actor", dtype: torch.dtype | None = None) -> None:
    """Write the HF directory ``out`` from a step folder (or a checkpoint dir: its newest step)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    step_folder = find_step_folder(checkpoint)
    hf_dir = os.path.join(step_folder, HF_DIR)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}/config.json is missing (the checkpoint was saved without hf_config); copy "
                              "the model's config.json and tokenizer files there and export again")
    weights = load_model_weights(step_folder, component)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    tied = getattr(model, "_tied_weights_keys", None) if getattr(config, "tie_word_embeddings", False) else None
    tied = tied if isinstance(tied, dict) else {}  # transformers 4 lists names without their source
    _tie_check(weights, tied, step_folder)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{step_folder}: the {component} weights do not fit hf/config.json ({err})") from None
    model.tie_weights()
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(hf_dir):  # tokenizer files (and config.json, rewritten below)
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(out, name))
    model.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step folder (checkpoints/step_XXXXXXXX) or a checkpoint directory")
    parser.add_argument("out", help="the HF directory to write")
    parser.add_argument("--component", default="actor", help="which model of the checkpoint (default: actor)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as saved)")
    args = parser.parse_args(argv)
    try:
        export_hf(args.checkpoint, args.out, args.component, DTYPES.get(args.dtype))
    except CheckpointError as err:
        print(f"export_hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
