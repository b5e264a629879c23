"""Evaluation: play every task of a split greedily through the env service and measure it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainer.rollout import EpisodeRecord


@dataclass(frozen=True)
class EvalResult:
    split: str
    episodes: int
    success: float
    avg_turns: float
    invalid_rate: float  # turns whose response named no admissible action
    repeated_rate: float  # turns repeating the previous action with the same feedback

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.split}: success {self.success:.1%} over {self.episodes} tasks, "
            f"avg turns {self.avg_turns:.1f}, invalid actions {self.invalid_rate:.1%}, "
            f"repeated actions {self.repeated_rate:.1%}"
        )


def summarize(split: str, episodes: list[EpisodeRecord]) -> EvalResult:
    turns = [turn for episode in episodes for turn in episode.turns]
    n_turns = max(1, len(turns))
    return EvalResult(
        split=split,
        episodes=len(episodes),
        success=sum(e.won for e in episodes) / max(1, len(episodes)),
        avg_turns=len(turns) / max(1, len(episodes)),
        invalid_rate=sum(not t.admissible for t in turns) / n_turns,
        repeated_rate=sum(t.repeated for t in turns) / n_turns,
    )
