"""Retry helpers shared by the database source: backoff and error classes.

The database comes and goes (restarts, failovers, network cuts); every loop that talks to it
waits with capped exponential backoff and full jitter, resets after a success, and tells a
transient connection problem apart from a bad statement so that it retries only the former.
"""

from __future__ import annotations

import random

import asyncpg

# SQLSTATEs that mean "the server or the link is away, try again", not "your statement is
# wrong": 08 connection exception, 57P operator intervention (shutdown, crash, starting up),
# 53 insufficient resources (too many connections, disk full), 58 system error (an I/O error
# on the server), 40001 serialization failure and 40P01 deadlock (the same statement succeeds
# when tried again).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "57P", "53", "58", "40001", "40P01")


class Backoff:
    """Exponential backoff with full jitter and a cap; ``reset()`` after a success.

    The n-th delay is uniform in ``[0, min(cap, base * 2**n)]`` so that many clients that lost
    the same server do not come back in lockstep.
    """

    def __init__(self, *, base: float, cap: float, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base} cap={cap}")
        self._base = base
        self._cap = cap
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._cap, self._base * 2.0 ** min(self._attempt, 30))
        self._attempt += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self._attempt = 0


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means the database is unreachable, so the work should be retried."""
    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def describe(exc: BaseException) -> str:
    """One short line for logs and ``SourceStatus.detail``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
