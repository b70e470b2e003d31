"""Scalar-head models: the critic (value model) and the frozen reward model, both FSDP2.

Both are a causal-LM backbone with a linear head to one number per position, sharded by the same
``parallelize`` as the actor (fp32 master weights; bf16 compute on CUDA).

* Critic: ``AutoModelForTokenClassification`` with ``num_labels=1``; the head's output at position
  ``t`` is V(s_t), the value of the prefix that predicts token ``t + 1``. Its dropout is set to 0
  (HF defaults token classifiers to 0.1, which would make the values of the update differ from the
  values of the rollout). Two initialisations:

  - from the actor (an FSDP2 causal LM sharded the same way): the critic is built on meta, sharded,
    and every backbone shard (``model.*``) is copied from the actor's local shard of the same name:
    no disk read, no gather. The head's weight is drawn from N(0, head_init_std^2) by a generator
    seeded with ``seed`` over the FULL shape (so every world size gets the same head) and each rank
    keeps its rows; with the default ``head_init_std=0`` it is zero, so every value starts at 0 and
    the first updates fit the head before any gradient reaches the backbone through it. The bias
    starts at 0.
  - from a reward-model directory (``AutoModelForSequenceClassification``, as
    ``tools/train_reward_model.py`` writes): backbone and ``score`` weight are the reward model's,
    the token classifier's extra bias starts at 0, so V(s_t) starts as the reward model's score of
    the prefix.

* Reward model: ``AutoModelForSequenceClassification.from_pretrained``, frozen. Which position is
  scored is ``rewards/model.py``'s business, not HF's pooling.

``check_model_dir`` turns a wrong directory into a ``ConfigError`` naming the config key, before
anything heavy starts.
"""

from __future__ import annotations

import copy
import glob
import json
import os

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import distribute_tensor
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
)

from ..config import ConfigError
from ..distributed.topology import Topology
from .parallelize import materialize, parallelize

BACKBONE_PREFIX = "model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_model_dir(path: str, key: str, tokenizer=None) -> PretrainedConfig:
    """The config of the HF model directory ``path``, or a ``ConfigError`` naming ``key``.

    With ``tokenizer`` (the policy's), also check that the model can read the policy's token ids:
    a reward model or critic scores them directly, so both must share one tokenizer.
    """
    where = f"{key}={path!r}"
    if not os.path.isdir(path):
        raise ConfigError(f"{where} is not a directory; point {key} at a Hugging Face model directory "
                          "(config.json + *.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{where} has no config.json; point {key} at a Hugging Face model directory")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ConfigError(f"{where} has no *.safetensors weights; save the model with "
                          "save_pretrained(..., safe_serialization=True) or convert it")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: config.json cannot be read ({err}); fix or regenerate it") from err
    if tokenizer is not None:
        check_same_tokenizer(path, key, config, tokenizer)
    return config


def check_same_tokenizer(path: str, key: str, config: PretrainedConfig, tokenizer) -> None:
    """Raise unless every policy token id exists in the model at ``path`` and means the same there.

    ``config.vocab_size`` may exceed ``len(tokenizer)`` (embedding tables are often padded), never
    fall short of it. When the directory ships a tokenizer, its vocabulary must equal the policy's.
    """
    fix = (f"the model at {key} scores the policy's token ids directly, so both must share one tokenizer; "
           f"train it on the policy's tokenizer (model.tokenizer_path / model.path) or point {key} at one that was")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None or vocab_size < len(tokenizer):
        raise ConfigError(f"{key}={path!r} has vocab_size={vocab_size} but the policy's tokenizer has "
                          f"{len(tokenizer)} tokens; {fix}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return  # no tokenizer in the directory (HF would make an empty one): the size is all we can check
    try:
        own = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{key}={path!r}: its tokenizer files cannot be read ({err}); fix or remove them") from err
    if own.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{key}={path!r} ships a tokenizer whose vocabulary differs from the policy's; {fix}")


def load_reward_model(path: str, topo: Topology, dtype: torch.dtype = torch.float32,
                      key: str = "reward.model.path") -> FSDPModule:
    """The frozen reward model at ``path`` in ``dtype``, sharded over the training mesh."""
    check_model_dir(path, key)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    if model.config.num_labels != 1:
        raise ConfigError(f"{key}={path!r} has num_labels={model.config.num_labels}; a reward model gives one score "
                          "(num_labels=1)")
    if model.config.pad_token_id is None:
        # HF's forward pools at the last token != pad_token_id and refuses batches without one; that
        # pooled score is discarded (rewards/model.py takes the last attended token), so any id does.
        model.config.pad_token_id = 0
    return parallelize(model, topo.fsdp_mesh, topo.device, activation_checkpointing=False, trainable=False)


def build_critic(hf_config: PretrainedConfig, topo: Topology, init_from: torch.nn.Module | str,
                 activation_checkpointing: bool = False, seed: int = 0, head_init_std: float = 0.0,
                 key: str = "critic.init_from", cpu_offload: bool = False) -> FSDPModule:
    """The trainable value model, initialised from the sharded actor or a reward-model directory.

    ``hf_config`` is the actor's (used with ``init_from=actor``; a reward-model directory brings its
    own). The caller checks a directory's tokenizer first (``check_model_dir(path, key, tokenizer)``).
    """
    if isinstance(init_from, str):
        return _critic_from_reward_model(init_from, topo, activation_checkpointing, key, cpu_offload)
    return _critic_from_actor(init_from, hf_config, topo, activation_checkpointing, seed, head_init_std, cpu_offload)


def critic_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """``hf_config`` with one output per position and no dropout before the head."""
    config = copy.deepcopy(hf_config)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    return config


@torch.no_grad()
def _critic_from_actor(actor: torch.nn.Module, hf_config: PretrainedConfig, topo: Topology,
                       activation_checkpointing: bool, seed: int, head_init_std: float,
                       cpu_offload: bool = False) -> FSDPModule:
    with torch.device("meta"):
        critic = AutoModelForTokenClassification.from_config(
            critic_config(hf_config), dtype=torch.float32, attn_implementation="sdpa"
        )
    critic = parallelize(critic, topo.fsdp_mesh, topo.device, activation_checkpointing, trainable=True,
                         cpu_offload=cpu_offload)
    materialize(critic, topo.device)
    actor_params = dict(actor.named_parameters())
    for name, param in critic.named_parameters():
        if name.startswith(BACKBONE_PREFIX):
            source = actor_params[name]
            assert source.to_local().shape == param.to_local().shape, f"{name}: actor and critic sharded differently"
            param.to_local().copy_(source.to_local())
    _init_head(critic, seed, head_init_std)
    actor_buffers = dict(actor.named_buffers())
    for name, buffer in critic.named_buffers():
        buffer.copy_(actor_buffers[name])  # non-persistent rotary tables: to_empty left them garbage
    return critic


def _init_head(critic: torch.nn.Module, seed: int, std: float) -> None:
    """Head weight ~ N(0, std^2) over the full shape from ``seed`` (0 when std is 0), bias 0."""
    for name, param in critic.score.named_parameters():
        full = torch.zeros(param.shape, dtype=param.dtype)
        if name == "weight" and std > 0:
            full.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        # src_data_rank=None: every rank holds the same full tensor and keeps its own rows, no communication
        local = distribute_tensor(full.to(param.to_local().device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())


def _critic_from_reward_model(path: str, topo: Topology,
                              activation_checkpointing: bool, key: str, cpu_offload: bool = False) -> FSDPModule:
    config = critic_config(check_model_dir(path, key))
    critic = AutoModelForTokenClassification.from_pretrained(
        path, config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    if critic.score.bias is not None:
        with torch.no_grad():
            critic.score.bias.zero_()  # the sequence classifier has no bias; HF gave the token classifier a random one
    return parallelize(critic, topo.fsdp_mesh, topo.device, activation_checkpointing, trainable=True,
                       cpu_offload=cpu_offload)
