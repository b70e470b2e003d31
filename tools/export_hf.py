"""Turn a training checkpoint into a Hugging Face model directory that transformers and vLLM load.

    python tools/export_hf.py outputs/run/checkpoints/step_00000120 exported/   # one step folder
    python tools/export_hf.py outputs/run/checkpoints/latest exported/          # the one `latest` names
    python tools/export_hf.py outputs/run/checkpoints exported/ --dtype float32  # the same; fp32 weights
    python tools/export_hf.py outputs/lora_run/checkpoints adapter/             # LoRA: PEFT adapter directory
    python tools/export_hf.py outputs/lora_run/checkpoints merged/ --merged     # LoRA: merged HF model
    python tools/export_hf.py ckpt merged/ --merged --base /models/qwen          # ... base moved since training

Reads only the actor's model weights from the DCP files, in one process on the CPU, whatever the
number of ranks that saved them (no process group). Writes ``config.json`` (with ``use_cache``
on, for generation) and the tokenizer's files (from the step folder's ``hf/``) and the weights as
safetensors through ``save_pretrained``, which leaves out tied weights (``lm_head.weight`` when
``tie_word_embeddings``) the way transformers expects them, and shards models past its size limit.
Weights are written in the model's own dtype (its config's ``dtype``: a bf16 model stays bf16;
fp32 when the config names none) unless ``--dtype`` says otherwise; training keeps fp32 masters.
A LoRA checkpoint of a run from ``model.path`` holds only the adapters: ``--merged`` reads the base
from the directory its config records (``base_model_name_or_path``) or from ``--base``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch

from spmd_rlhf.models.vlm import model_class
from spmd_rlhf.trainer.checkpoint import load_model_weights
from spmd_rlhf.trainer.checkpoint_files import HF_DIR, LATEST, CheckpointError, is_complete, newest_checkpoint

LORA_KEY = "spmd_rlhf_lora"  # models/lora.py's CONFIG_KEY: a LoRA actor's settings in its config
PEFT_PREFIX = "base_model.model."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_step_folder(checkpoint: str) -> str:
    """``checkpoint`` itself if it is a step folder; the step a ``latest`` file names; else the
    newest complete step folder inside the directory ``checkpoint``."""
    if os.path.basename(os.path.normpath(checkpoint)) == LATEST and os.path.isfile(checkpoint):
        with open(checkpoint, encoding="utf-8") as f:
            named = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f.read().strip())
        if not is_complete(named):
            raise CheckpointError(f"{checkpoint} names {named}, which is not a complete step folder; pass another "
                                  "checkpoints/step_XXXXXXXX folder")
        return named
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


def model_dtype(config) -> torch.dtype:
    """The dtype a model's config names (``dtype``, e.g. bfloat16 for most chat models); fp32 if none."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def base_weights(weights: dict[str, torch.Tensor], lora: dict, base: str | None,
                 step_folder: str) -> dict[str, torch.Tensor]:
    """The frozen base's weights under the base model's names: from the checkpoint, or, where it
    holds only the adapters, from ``base`` (default: the directory the run read, its config says)."""
    held = {name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."): tensor
            for name, tensor in weights.items() if ".lora_" not in name}
    if any(name.endswith(".weight") for name in held):
        return held
    from transformers import AutoConfig

    base = base or lora.get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"{step_folder} holds only LoRA adapters and their base {base!r} is not a directory; "
                              "pass --base <the model.path the run trained from>")
    model = model_class(AutoConfig.from_pretrained(base)).from_pretrained(base, dtype=torch.float32)
    return {**{name: tensor.detach() for name, tensor in model.state_dict().items()}, **held}


def merge_lora(weights: dict[str, torch.Tensor], lora: dict,
               base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's weights ``base`` with ``W + (alpha / r) B A`` for the adapted ones, the
    adapters taken from a PEFT model's ``weights``."""
    scale = lora["lora_alpha"] / lora["r"]
    merged = dict(base)
    for name, a in weights.items():
        if ".lora_A.default.weight" in name:
            module = name.removesuffix(".lora_A.default.weight")
            b = weights[f"{module}.lora_B.default.weight"]
            target = module.removeprefix(PEFT_PREFIX) + ".weight"
            merged[target] = merged[target] + scale * (b.float() @ a.float()).to(merged[target].dtype)
    return merged


def export_adapter(weights: dict[str, torch.Tensor], lora: dict, hf_dir: str, out: str,
                   dtype: torch.dtype | None) -> None:
    """PEFT's adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors`` (the
    adapters only, named as ``PeftModel.save_pretrained`` names them) and the tokenizer's files."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapters = {name.replace(".default.", "."): tensor.to(dtype or tensor.dtype).contiguous()
                for name, tensor in weights.items() if ".lora_" in name}
    if not adapters:
        raise CheckpointError(f"{hf_dir}/config.json names LoRA adapters but the checkpoint holds none")
    os.makedirs(out, exist_ok=True)
    LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
               target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=lora.get("base_model_name_or_path")).save_pretrained(out)
    save_file(adapters, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(hf_dir):  # tokenizer files; the base model's config.json is not the adapter's
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src) and name != "config.json":
            shutil.copy2(src, os.path.join(out, name))


def export_hf(checkpoint: str, out: str, component: str = "actor", dtype: torch.dtype | None = None,
              merged: bool = False, base: str | None = None) -> None:
    """Write the HF directory ``out`` from a step folder, a ``latest`` file or a checkpoint dir
    (its newest step), in ``dtype`` (default: the model's own). A LoRA actor is written as PEFT's
    adapter directory, or with ``merged`` as the HF model with the adapters merged in (the base read
    from ``base`` or its recorded directory where the checkpoint holds only the adapters)."""
    from transformers import AutoConfig

    step_folder = find_step_folder(checkpoint)
    hf_dir = os.path.join(step_folder, HF_DIR)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir}/config.json is missing (the checkpoint was saved without hf_config); copy "
                              "the model's config.json and tokenizer files there and export again")
    weights = load_model_weights(step_folder, component)
    config = AutoConfig.from_pretrained(hf_dir)
    lora = config.to_dict().get(LORA_KEY)
    if lora is not None:  # a LoRA actor: the adapter directory, or the merged model
        delattr(config, LORA_KEY)
        if not merged:
            export_adapter(weights, lora, hf_dir, out, dtype)
            return
        weights = merge_lora(weights, lora, base_weights(weights, lora, base, step_folder))
    dtype = dtype or model_dtype(config)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    config.use_cache = True  # training turns the KV cache off; generation wants it
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=dtype)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step folder (checkpoints/step_XXXXXXXX), checkpoints/latest, or a "
                        "checkpoint directory (its newest step)")
    parser.add_argument("out", help="the HF directory to write")
    parser.add_argument("--component", default="actor", help="which model of the checkpoint (default: actor)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype (default: the model's own, from its config; float32 if it names none)")
    parser.add_argument("--merged", action="store_true",
                        help="a LoRA actor: write the HF model with the adapters merged in (default: PEFT's "
                        "adapter directory)")
    parser.add_argument("--base", default=None,
                        help="with --merged: the base model directory, where the checkpoint holds only the adapters "
                        "(default: the model.path the run recorded)")
    args = parser.parse_args(argv)
    try:
        export_hf(args.checkpoint, args.out, args.component, DTYPES.get(args.dtype), args.merged, args.base)
    except CheckpointError as err:
        print(f"export_hf: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
