"""The expert of engines that give a gold action sequence but no planner (ScienceWorld,
TextWorldExpress): the next gold action while the agent has followed the sequence, None
once it leaves it (no deviation can be assumed harmless to the rest of the path)."""

from __future__ import annotations

from services.env.household.world import normalise


class GoldPath:
    def __init__(self, actions: list[str]) -> None:
        self.actions = actions
        self.reset()

    def reset(self) -> None:
        self.taken = 0  # how many gold actions the agent has taken, in order
        self.followed = True

    def record(self, action: str) -> None:
        """The agent did ``action``: one more gold action taken, or the path is left."""
        expected = self.actions[self.taken] if self.taken < len(self.actions) else None
        if self.followed and expected is not None and normalise(action) == normalise(expected):
            self.taken += 1
        else:
            self.followed = False

    def next_action(self, done: bool) -> str | None:
        if done or not self.followed or self.taken >= len(self.actions):
            return None
        return self.actions[self.taken]

    def steps_left(self, won: bool, done: bool) -> int | None:
        if won:
            return 0
        if done or not self.followed:
            return None
        return len(self.actions) - self.taken
