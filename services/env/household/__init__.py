"""The embedded household world: ALFWorld-style text tasks in pure standard-library Python.

``HouseholdEnvironment`` is the EnvironmentFamily named "household". Tasks are
built from (split, task_id) alone (see catalog.py); the seed argument of make()
is accepted for the interface and ignored, so a task is the same world always.
"""

from __future__ import annotations

from services.env.base import EnvironmentFamily
from services.env.household.catalog import SPLIT_SIZES, build_task, task_combination
from services.env.household.world import HouseholdEpisode

__all__ = ["HouseholdEnvironment", "HouseholdEpisode", "task_combination"]


class HouseholdEnvironment(EnvironmentFamily):
    """ALFWorld's six task types in small numbered-receptacle rooms; see docs/environments.md."""

    name = "household"

    def splits(self) -> dict[str, int]:
        return dict(SPLIT_SIZES)

    def make(self, split: str, task_id: int, seed: int = 0) -> HouseholdEpisode:
        """The episode for (split, task_id); KeyError for an unknown split or id."""
        return HouseholdEpisode(build_task(split, task_id))
