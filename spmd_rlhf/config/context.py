"""Whether a prompt and its response fit the model's positions, checked before any process group."""

from __future__ import annotations

from .schema import Config, ConfigError


def check_context_length(cfg: Config, max_positions: int | None) -> None:
    """Raise ``ConfigError`` when ``data.max_prompt_length + rollout.max_new_tokens`` exceeds the
    model's ``max_position_embeddings`` with the torch engine (which would run on past the positions
    the model was trained for; vLLM caps its own ``max_model_len``). ``max_positions``: None when
    the model's config does not say."""
    if cfg.rollout.engine != "torch" or max_positions is None:
        return
    prompt, new = cfg.data.max_prompt_length, cfg.rollout.max_new_tokens
    if prompt + new <= max_positions:
        return
    raise ConfigError(
        f"data.max_prompt_length={prompt} + rollout.max_new_tokens={new} = {prompt + new} tokens exceed the model's "
        f"max_position_embeddings={max_positions}; lower data.max_prompt_length or rollout.max_new_tokens so that "
        f"they add up to at most {max_positions}")
