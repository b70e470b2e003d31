"""Check a run's configuration once, in one process, before a launcher starts its ranks.

    python -m spmd_rlhf.check --world-size 8 recipe=grpo_gsm8k model.path=...   # exit 0, or 2 and one line

A configuration error inside ranks that torchrun started is followed by torchrun's own report of the
failed child (its traceback, a table of ranks); checked here first, the user sees one line. The checks
are the run's own (``train.preflight``): keys, values, model files, data, tokenizer, reward functions.
``launch/torchrun.sh`` and ``launch/submit.py`` call this before they start anything.
"""

from __future__ import annotations

import argparse
import sys


def compose_config(overrides: list[str]):
    """``(Config, plain dict, DictConfig)`` as ``python -m spmd_rlhf.train OVERRIDES`` composes them.
    A key or value Hydra refuses is a ``ConfigError`` here."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from . import train  # registers the schema and the recipes
    from .config import ConfigError, check_known_keys

    try:
        with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base="1.3", job_name="spmd_rlhf"):
            dcfg = compose(config_name="config", overrides=[o for o in overrides if not o.startswith("hydra.")])
        config_dict = OmegaConf.to_container(dcfg, resolve=True)
        check_known_keys(config_dict)  # a +key the schema lacks would be dropped silently by to_object
        return OmegaConf.to_object(dcfg), config_dict, dcfg
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(" ".join(str(err).split())) from err


def check(overrides: list[str], world_size: int) -> None:
    """Everything ``train.run`` checks before its process group, for a job of ``world_size`` ranks."""
    from . import train

    cfg, config_dict, _ = compose_config(overrides)
    *_, scorer = train.preflight(cfg, world_size, config_dict)
    scorer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spmd_rlhf.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=1, help="ranks the job will have (all nodes)")
    args, overrides = parser.parse_known_args(argv)
    from .config import ConfigError

    try:
        check(overrides, args.world_size)
    except ConfigError as err:
        print(f"spmd_rlhf: configuration error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
