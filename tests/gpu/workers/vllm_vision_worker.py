"""One GPU, one process: vLLM with a vision-language policy against the TorchEngine, both synced
from the same tiny random Qwen2.5-VL (``tools/make_tiny_model.py qwen2_5_vl``, made in argv[2]).

Prompts with one image, two images of different sizes, and none, in one batch. vLLM receives
one placeholder per image and the images, runs its own image processor and expands them (the
engine raises if its expansion is not the data loader's); its weights arrive through the full
sync in HF names. Writes a JSON report to argv[1]; tests/gpu/test_vllm_vision.py asserts on it.

Both engines keep the image/video placeholders out of the responses; the TorchEngine reports
log_softmax(logits) (the actor's), vLLM the log-prob after its logit bias, larger by
-log(1 - p_placeholders). The report's gap is vLLM's against the TorchEngine's with that term added,
the placeholders' mass computed here by the HF model on each prompt + response.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: E402

from spmd_rlhf.data.vision import load_image_processing  # noqa: E402
from spmd_rlhf.distributed.topology import init_distributed, shutdown  # noqa: E402
from spmd_rlhf.models.vlm import (image_token_id, placeholder_token_ids, spatial_merge_size,  # noqa: E402
                                  vision_forward_kwargs)
from spmd_rlhf.rollout.base import SamplingConfig  # noqa: E402
from spmd_rlhf.rollout.torch_engine import TorchEngine  # noqa: E402
from spmd_rlhf.rollout.vllm_engine import VLLMEngine  # noqa: E402

from tests.unit.test_vision_data import make_tiny  # noqa: E402  (tools/make_tiny_model.py, loaded by path)

EOS, PAD, START, END, IMAGE = 1, 0, 15, 16, 17


def prompts(processing) -> tuple[list[list[int]], list]:
    rng = torch.Generator().manual_seed(0)
    image = lambda size: Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=rng,  # noqa: E731
                                                       dtype=torch.uint8).numpy())
    rows = [([START, IMAGE, END, 13], [image(56)]),
            ([5, START, IMAGE, END, 7, START, IMAGE, END, 13], [image(84), image(56)]),
            ([4, 5, 12, 6, 7, 13], None), ([START, IMAGE, END, 9, 13], [image(112)])]
    ids, visions = [], []
    for tokens, images in rows:
        expanded, vision = processing.prompt(tokens, images) if images else (tokens, None)
        ids.append(expanded)
        visions.append(vision)
    return ids, visions


def placeholder_log_mass(model, config, ids: list[int], response: list[int], vision, device) -> list[float]:
    """log p(placeholders) at each response position under the HF model (fp32)."""
    tokens_1T = torch.tensor([ids + response[:-1]])
    inputs = {k: t.to(device) for k, t in
              vision_forward_kwargs(config, tokens_1T, torch.ones_like(tokens_1T), [vision]).items()}
    with torch.no_grad():
        logits_TV = model(input_ids=tokens_1T.to(device), **inputs).logits[0, len(ids) - 1:].float()
    logprobs_TV = torch.log_softmax(logits_TV, dim=-1)
    return torch.logsumexp(logprobs_TV[:, placeholder_token_ids(config)], dim=-1).tolist()


def main(out_path: str, model_dir: str) -> None:
    topo = init_distributed(1, 1, 600)
    make_tiny.make_tiny_model("qwen2_5_vl", model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    weights = [(name, p.detach().to(topo.device)) for name, p in model.named_parameters()]
    processing = load_image_processing(model_dir, image_token_id(config), spatial_merge_size(config))
    ids, visions = prompts(processing)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    torch_engine = TorchEngine(config, topo.gen_mesh, topo.device, torch.float32, [EOS], PAD)
    torch_engine.load_weights([weights])
    want = torch_engine.generate(ids, greedy, vision=visions)
    engine = VLLMEngine(config, topo.gen_mesh, topo.device, torch.float32, [EOS], model_path=model_dir,
                        weight_sync="full", max_model_len=256, gpu_memory_utilization=0.2, enforce_eager=True,
                        max_images=2)
    engine.load_weights([weights])
    got = engine.generate(ids, greedy, vision=visions)
    model = model.to(topo.device)
    masses = [placeholder_log_mass(model, config, p, r, v, topo.device)
              for p, r, v in zip(ids, want.token_ids, visions)]
    expected = [[lp - torch.log1p(-torch.tensor(m).exp()).item() for lp, m in zip(row, ms)]
                for row, ms in zip(want.logprobs, masses)]
    gaps = [abs(a - b) for g, w in zip(got.logprobs, expected) for a, b in zip(g, w)]
    report = {"tokens_equal": got.token_ids == want.token_ids, "torch_tokens": want.token_ids,
              "vllm_tokens": got.token_ids, "max_logprob_gap": max(gaps, default=0.0),
              "max_placeholder_mass": max((torch.tensor(m).exp().max().item() for m in masses if m), default=0.0),
              "max_gap_to_unbiased": max((abs(a - b) for g, w in zip(got.logprobs, want.logprobs)
                                          for a, b in zip(g, w)), default=0.0),
              "no_placeholder_generated": all(t not in (IMAGE, 18) for row in got.token_ids for t in row)}
    sampled = engine.generate(ids, SamplingConfig(max_new_tokens=8, n=4, temperature=1.0, seed=3), vision=visions,
                              seeds=[0, 1, 2, 3])
    report["sampled_rows"] = len(sampled)
    engine.close()
    with open(out_path, "w") as f:
        json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
