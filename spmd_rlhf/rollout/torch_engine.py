"""A rollout engine in plain PyTorch: the HF model under the tensor-parallel plan, no vLLM.

Each tp group of the generation mesh hosts one replica. Its ranks all-gather their prompts,
generate the concatenation in lock-step (identical inputs, identical sampled tokens), and each
returns its own share; different replicas (gen_dp ranks) generate different prompts.

Generation is batched: chunks of ``max_batch_size`` rows, left-padded, one prefill and then one
forward per decode step over the whole chunk with a ``DynamicCache``; a row ends at EOS or once its
tokens end with one of ``SamplingConfig.stop_sequences``. Sampling runs in fp32
(temperature, top-k, top-p); with per-prompt ``seeds`` every sample inverts its distribution at a
draw of its own stream (``base.sample_seeds``), so it does not depend on the batch around it;
without them one ``torch.Generator`` seeded by ``SamplingConfig.seed`` draws for the call. The
sampled tokens are also broadcast from tp rank 0 each step, so that a last-bit difference in
logits between ranks can never make them disagree on tokens or on when to stop (which would
desynchronise their collectives). Logprobs are taken under ``softmax(logits / T)`` before
filtering, the quantity the actor recomputes with ``log_softmax(logits / T)``.

A vision-language policy (Qwen2-VL family) takes each row's ``VisionInputs``: the prefill passes the
chunk's pixel patches and grids (row order) and explicit M-RoPE positions ``[3, B, L]``
(``models/vlm.vision_forward_kwargs``: at each row's unpadded tokens); a decode step continues each row at
its largest position + 1 on all three axes, as HF's ``rope_deltas`` do.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from spmd_rlhf.data.vision import VisionInputs
from spmd_rlhf.distributed.tp_plan import apply_tensor_parallel
from spmd_rlhf.models.vlm import (is_vision_language, model_class, placeholder_token_ids, text_config,
                                  vision_forward_kwargs)
from spmd_rlhf.rollout.base import EngineBase, SamplingConfig, Samples, gather_tp_prompts, sample_seeds


@dataclass
class _Chunk:
    """Generated rows of one chunk, on the host."""

    tokens_BT: torch.Tensor
    logprobs_BT: torch.Tensor
    lengths_B: torch.Tensor
    stopped_B: torch.Tensor


def sample_tokens(
    logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
    uniform_B: torch.Tensor | None = None, banned_V: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; returns ``(tokens_B, logprobs_B)``.

    Logprobs are of the drawn token under ``softmax(logits / T)`` (T = 1 when greedy), before
    top-k/top-p. Top-p keeps the smallest prefix of the sorted distribution whose mass reaches
    ``top_p`` (the top token always); it applies after top-k, as in HF. With ``uniform_B`` (one
    float64 draw in [0, 1) per row) the token is found by inverting the row's distribution
    instead of drawing from ``generator``, so a row's token depends on its own draw only.
    ``banned_V`` (bool per token id) are never drawn; like top-k they leave the logprobs unchanged.
    """
    logits_BV = logits_BV.float()
    if sampling.temperature == 0:
        choices_BV = logits_BV if banned_V is None else logits_BV.masked_fill(banned_V, float("-inf"))
        tokens_B = choices_BV.argmax(dim=-1)
        logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
        return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
    scaled_BV = logits_BV / sampling.temperature
    logprobs_BV = torch.log_softmax(scaled_BV, dim=-1)
    filtered_BV = scaled_BV if banned_V is None else scaled_BV.masked_fill(banned_V, float("-inf"))
    vocab = scaled_BV.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_B1 = torch.topk(scaled_BV, sampling.top_k, dim=-1).values[:, -1:]
        filtered_BV = filtered_BV.masked_fill(filtered_BV < kth_B1, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_BV, order_BV = torch.sort(filtered_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        mass_before_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
        drop_BV = mass_before_BV >= sampling.top_p
        drop_BV[:, 0] = False
        filtered_BV = filtered_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = torch.softmax(filtered_BV, dim=-1)
    if uniform_B is None:
        tokens_B = torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
    else:
        tokens_B = inverse_cdf(probs_BV, uniform_B)
    return tokens_B, logprobs_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def inverse_cdf(probs_BV: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability (float64) exceeds ``uniform * total``; never
    a token of probability zero."""
    cdf_BV = torch.cumsum(probs_BV.double(), dim=-1)
    target_B1 = uniform_B.to(cdf_BV)[:, None] * cdf_BV[:, -1:]
    tokens_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1)
    last_B = probs_BV.shape[-1] - 1 - (probs_BV > 0).flip(-1).int().argmax(-1)
    return torch.minimum(tokens_B, last_B)


def row_uniforms(seeds: list[int], steps: int, device: torch.device) -> torch.Tensor:
    """``[B, steps]`` float64 draws in [0, 1), row ``b`` from a generator seeded by ``seeds[b]``."""
    rows = [torch.rand(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(rows).to(device)


def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids_BL, attention_mask_BL)`` with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids_BL = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask_BL = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids_BL[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask_BL[row, width - len(prompt):] = 1
    return ids_BL.to(device), mask_BL.to(device)


class TorchEngine(EngineBase):
    """HF causal LM + tensor-parallel plan + batched KV-cache sampling (``RolloutEngine``).

    Takes the tp slices of ``reshard_stream`` in the trainer's plan unchanged (``EngineBase``)."""

    def __init__(
        self,
        hf_config: PretrainedConfig,
        gen_mesh: DeviceMesh,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_batch_size: int = 256,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("rollout engine needs at least one EOS token id (tokenizer eos_token_id)")
        if max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype  # the weight sync converts to it before sending
        self.tp_mesh = gen_mesh["tp"]
        self.tp_group = self.tp_mesh.get_group()
        self.eos_ids = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=self.device)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        # a vision-language policy's config (its positions and pixel inputs); it never generates
        # image/video placeholders (they would be taken for images by the actor's forward)
        self.vision_config = hf_config if is_vision_language(hf_config) else None
        self.banned_V = None
        if self.vision_config is not None:
            self.banned_V = torch.zeros(text_config(hf_config).vocab_size, dtype=torch.bool, device=self.device)
            self.banned_V[placeholder_token_ids(hf_config)] = True
        with torch.device(self.device):
            model = model_class(hf_config).from_config(copy.deepcopy(hf_config), dtype=dtype)
        model.eval().requires_grad_(False)
        self.model = apply_tensor_parallel(model, self.tp_mesh)
        self._params = dict(self.model.named_parameters())

    # -- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Copy each tensor-parallel slice into its parameter's local tensor."""
        for bucket in buckets:
            for name, piece in bucket:
                assert name in self._params, f"engine has no parameter {name}"
                param = self._params[name]
                local = param.to_local() if isinstance(param, DTensor) else param
                assert local.shape == piece.shape, f"{name}: engine slice {tuple(local.shape)} != {tuple(piece.shape)}"
                local.copy_(piece)
        self.weight_version += 1

    def sleep(self) -> None:
        """Free cached allocator blocks. The KV cache already died with ``generate``; the
        weights stay resident (this engine has no offload), so on CUDA little is freed."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Nothing to restore: ``sleep`` kept the weights."""

    # -- generation ------------------------------------------------------------------------

    def _agree(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Make every tp rank hold tp rank 0's tokens."""
        if self.tp_mesh.size() > 1:
            dist.broadcast(tokens_B, group=self.tp_group, group_src=0)
        return tokens_B

    def _forward(
        self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, positions_BL: torch.Tensor, cache: Cache | None,
        pixels: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """One model step over the new positions (``[B, L]``, or ``[3, B, L]`` M-RoPE; ``pixels``: the
        prefill's images); returns last-position logits and the cache."""
        out = self.model(
            input_ids=ids_BL,
            attention_mask=mask_BL,
            position_ids=positions_BL,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **(pixels or {}),
        )
        return out.logits[:, -1], out.past_key_values

    def _prefill(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, visions: list[VisionInputs | None] | None
                 ) -> tuple[torch.Tensor, Cache, torch.Tensor]:
        """The prompts' forward: last logits, the cache and each row's next position ``[B, 1]``."""
        assert self.vision_config is not None or visions is None or all(v is None for v in visions), \
            "images for a text-only policy"
        pixels = {}
        if self.vision_config is not None and visions is not None:  # M-RoPE positions and pixels of image rows
            pixels = {k: v.to(self.device) for k, v in
                      vision_forward_kwargs(self.vision_config, ids_BL.cpu(), mask_BL.cpu(), visions).items()}
        positions = pixels.pop("position_ids", (mask_BL.cumsum(-1) - 1).clamp(min=0))  # [3, B, L] or [B, L]
        logits_BV, cache = self._forward(ids_BL, mask_BL, positions, None, pixels)
        top_B = positions.amax(dim=-1)
        return logits_BV, cache, (top_B if top_B.ndim == 1 else top_B.amax(dim=0))[:, None] + 1

    def _positions(self, next_pos_B1: torch.Tensor) -> torch.Tensor:
        """A decode step's positions: ``[B, 1]``, or the same on all three M-RoPE axes."""
        return next_pos_B1 if self.vision_config is None else next_pos_B1[None].expand(3, -1, -1)

    def _ends(self, tokens_BT: torch.Tensor, stops: list[torch.Tensor], ignore_eos: bool) -> torch.Tensor:
        """Rows whose tokens so far end with EOS (unless ``ignore_eos``) or with a stop sequence."""
        ended_B = torch.zeros(tokens_BT.shape[0], dtype=torch.bool, device=tokens_BT.device)
        if not ignore_eos:
            ended_B |= torch.isin(tokens_BT[:, -1], self.eos_ids)
        for stop_K in stops:
            if len(stop_K) <= tokens_BT.shape[1]:
                ended_B |= (tokens_BT[:, -len(stop_K):] == stop_K).all(-1)
        return ended_B

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingConfig, generator: torch.Generator,
                        seeds: list[int] | None = None, visions: list[VisionInputs | None] | None = None) -> _Chunk:
        ids_BL, mask_BL = left_pad(prompts, self.pad_token_id, self.device)
        logits_BV, cache, next_pos_B1 = self._prefill(ids_BL, mask_BL, visions)
        batch, steps = len(prompts), sampling.max_new_tokens
        tokens_BT = torch.full((batch, steps), self.pad_token_id, dtype=torch.long, device=self.device)
        logprobs_BT = torch.zeros((batch, steps), dtype=torch.float32, device=self.device)
        lengths_B = torch.zeros(batch, dtype=torch.long, device=self.device)
        done_B = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stopped_B = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stops = [torch.tensor(seq, dtype=torch.long, device=self.device) for seq in sampling.stop_sequences]
        uniform_BT = None if seeds is None or sampling.temperature == 0 else row_uniforms(seeds, steps, self.device)
        for step in range(steps):
            uniform_B = None if uniform_BT is None else uniform_BT[:, step]
            tokens_B, logprobs_B = sample_tokens(logits_BV, sampling, generator, uniform_B, self.banned_V)
            tokens_B = self._agree(tokens_B).masked_fill(done_B, self.pad_token_id)
            tokens_BT[:, step] = tokens_B
            logprobs_BT[:, step] = logprobs_B.masked_fill(done_B, 0.0)
            lengths_B += (~done_B).long()
            ended_B = self._ends(tokens_BT[:, :step + 1], stops, sampling.ignore_eos) & ~done_B
            stopped_B |= ended_B
            done_B |= ended_B
            if step == steps - 1 or bool(done_B.all()):
                break
            mask_BL = torch.cat([mask_BL, (~done_B).long()[:, None]], dim=1)
            logits_BV, cache = self._forward(tokens_B[:, None], mask_BL, self._positions(next_pos_B1), cache)
            next_pos_B1 = next_pos_B1 + 1
        return _Chunk(tokens_BT.cpu(), logprobs_BT.cpu(), lengths_B.cpu(), stopped_B.cpu())

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None, vision: list[VisionInputs | None] | None = None) -> Samples:
        """``sampling.n`` completions per prompt of this rank, prompt-major. Without ``seeds`` one
        generator seeded by ``sampling.seed`` draws for the whole call; with them (one per prompt)
        sample ``j`` of a prompt draws from its own stream (``sample_seeds``), whatever the batch.
        ``vision``: each prompt's images (a vision-language policy), gathered with the prompts."""
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("rollout prompts must hold at least one token")
        assert seeds is None or len(seeds) == len(prompt_token_ids)
        assert vision is None or len(vision) == len(prompt_token_ids)
        prompts, offset = gather_tp_prompts(self.tp_mesh, prompt_token_ids)
        row_seeds = None
        if seeds is not None:
            all_seeds, _ = gather_tp_prompts(self.tp_mesh, seeds)
            row_seeds = sample_seeds(sampling.seed, all_seeds, sampling.n)
        visions = None
        if self.vision_config is not None:  # every tp rank takes part, images or not
            all_visions, _ = gather_tp_prompts(self.tp_mesh, vision or [None] * len(prompt_token_ids))
            visions = [v for v in all_visions for _ in range(sampling.n)]
        rows = [p for p in prompts for _ in range(sampling.n)]
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        samples = Samples([], [], [])
        for start in range(0, len(rows), self.max_batch_size):
            window = slice(start, start + self.max_batch_size)
            chunk_seeds = None if row_seeds is None else row_seeds[window]
            chunk = self._generate_chunk(rows[window], sampling, generator, chunk_seeds,
                                         None if visions is None else visions[window])
            for tokens_T, logprobs_T, length, stopped in zip(
                chunk.tokens_BT.tolist(), chunk.logprobs_BT.tolist(), chunk.lengths_B.tolist(), chunk.stopped_B.tolist()
            ):
                samples.token_ids.append(tokens_T[:length])
                samples.logprobs.append(logprobs_T[:length])
                samples.finish_reasons.append("stop" if stopped else "length")
        mine = slice(offset * sampling.n, (offset + len(prompt_token_ids)) * sampling.n)
        return Samples(samples.token_ids[mine], samples.logprobs[mine], samples.finish_reasons[mine])
