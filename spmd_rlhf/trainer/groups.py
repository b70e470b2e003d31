"""A rank's rollout kept as groups; defined in ``rollout/groups.py`` (the generation step builds it)."""

from ..rollout.groups import Rollout, concat

__all__ = ["Rollout", "concat"]
