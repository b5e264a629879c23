"""Sessions: one live episode each, with a turn limit, a cap on their number and an idle TTL.

Knows nothing of HTTP; the app maps its exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from services.env.base import Episode, StepOutcome, TaskSpec


class SessionNotFound(KeyError):
    pass


class SessionLimitReached(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"session cap reached; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class EpisodeFinished(Exception):
    pass


@dataclass
class Session:
    id: str
    episode: Episode
    task: TaskSpec
    max_turns: int
    blocking: bool
    last_used: float
    turn: int = 0
    done: bool = False
    won: bool = False
    truncated: bool = False
    score: float = 0.0
    # One request at a time acts on an episode; environments are not thread-safe.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def reset(self) -> StepOutcome:
        outcome = self.episode.reset()
        self.turn, self.done, self.won, self.truncated = 0, outcome.done, outcome.won, False
        self.score = outcome.score
        return outcome

    def step(self, action: str) -> StepOutcome:
        if self.done:
            raise EpisodeFinished(self.id)
        outcome = self.episode.step(action)
        self.turn += 1
        self.won, self.score = outcome.won, outcome.score
        self.truncated = not outcome.done and self.turn >= self.max_turns
        self.done = outcome.done or self.truncated
        return outcome


class SessionStore:
    """Live sessions by id, at most ``max_sessions``, each closed after ``ttl_s`` idle."""

    def __init__(
        self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(
        self, episode: Episode, max_turns: int | None = None, blocking: bool = False
    ) -> Session:
        """Register a built episode; raises SessionLimitReached when the store is full."""
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimitReached(self.retry_after_s())
        session = Session(
            id=uuid.uuid4().hex,
            episode=episode,
            task=episode.task,
            max_turns=max_turns or episode.task.max_turns,
            blocking=blocking,
            last_used=self.clock(),
        )
        self._sessions[session.id] = session
        return session

    def has_room(self) -> bool:
        return len(self._sessions) < self.max_sessions

    def retry_after_s(self) -> int:
        """Seconds until the stalest session expires: when a slot may open by itself."""
        if not self._sessions:
            return 1
        stalest = min(s.last_used for s in self._sessions.values())
        return max(1, math.ceil(stalest + self.ttl_s - self.clock()))

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        session.last_used = self.clock()
        return session

    def pop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def discard(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def pop_expired(self) -> list[Session]:
        """Remove and return the sessions idle for longer than the TTL (caller closes them)."""
        now = self.clock()
        expired = [s for s in self._sessions.values() if now - s.last_used > self.ttl_s]
        for session in expired:
            # A session busy with a request is in use, not idle.
            if not session.lock.locked():
                del self._sessions[session.id]
        return [s for s in expired if s.id not in self._sessions]

    def pop_all(self) -> list[Session]:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        return sessions
