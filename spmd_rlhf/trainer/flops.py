"""Model FLOPs and MFU of the training passes (``perf/mfu/*``).

Counted as "model FLOPs" (PaLM, Chowdhery et al., 2022, appendix B): the arithmetic the model
needs, not what the implementation spends, so activation recompute does not count and a
pass's FLOPs are the same however it is batched or packed. Per sequence of ``s`` tokens of which
``r`` are scored (the response positions the loss reads):

    forward  = 2 * body_params * s                  every token through the decoder
             + 2 * head_params * r                  lm_head only where a log-prob is read
             + 2 * layers * attn_width * s * s      causal attention: QK^T and AV over ~s/2 keys
    backward = 2 * forward

``body_params`` are the decoder's matrix weights a token passes through (no embedding lookup, no
norms; in a mixture-of-experts layer the router, the ``top_k`` experts it picks and any shared
expert, not all experts), ``head_params`` the lm_head's (counted once when tied), ``attn_width`` =
heads * head_dim. A vision-language model counts its language model (the vision tower is not
counted). MFU is FLOPs over the
pass's wall time and the device's dense bf16 peak (``trainer.peak_tflops`` overrides the table).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.1, "A10G": 125.0, "L4": 121.0}


@dataclass(frozen=True)
class FlopsModel:
    body_params: int
    head_params: int
    layers: int
    attn_width: int

    def forward(self, seq_lens: list[int], scored: list[int]) -> float:
        """Forward FLOPs of sequences of ``seq_lens`` tokens with ``scored`` log-prob positions each."""
        assert len(seq_lens) == len(scored)
        tokens, squares = sum(seq_lens), sum(s * s for s in seq_lens)
        return (2.0 * self.body_params * tokens + 2.0 * self.head_params * sum(scored)
                + 2.0 * self.layers * self.attn_width * squares)

    def train(self, seq_lens: list[int], scored: list[int]) -> float:
        """Forward plus backward (twice the forward)."""
        return 3.0 * self.forward(seq_lens, scored)


def _mlp_params(c, layer: int) -> int:
    """Matrix weights one token passes through in ``layer``'s MLP: dense (gate, up, down), or a
    Qwen-MoE sparse layer's router, ``num_experts_per_tok`` routed experts and shared expert."""
    experts = getattr(c, "num_experts", 0) or 0
    step = getattr(c, "decoder_sparse_step", 1) or 1
    sparse = experts > 0 and layer not in (getattr(c, "mlp_only_layers", None) or []) and (layer + 1) % step == 0
    if not sparse:
        return 3 * c.hidden_size * c.intermediate_size
    shared = getattr(c, "shared_expert_intermediate_size", 0) or 0
    routed = c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    return c.hidden_size * experts + routed + 3 * c.hidden_size * shared + (c.hidden_size if shared else 0)


def flops_model(hf_config) -> FlopsModel:
    """The counts of a decoder-only HF config (Llama/Qwen/Mistral layout, Qwen2/3-MoE), or of a
    vision-language config's text model."""
    c = hf_config.get_text_config()
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    attn = c.hidden_size * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    body = sum(attn + _mlp_params(c, layer) for layer in range(c.num_hidden_layers))
    return FlopsModel(body_params=body, head_params=c.hidden_size * c.vocab_size,
                      layers=c.num_hidden_layers, attn_width=heads * head_dim)


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when neither the override nor the table knows it."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in device_name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved over peak FLOP/s for one device's share of the work."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
