"""How long a running job has left, from its progress fraction, its stage and its history.

The fraction ``f`` is the tracker's: each stage owns a share of 0..1. With a prior (stage name ->
expected seconds, from earlier runs of the same workflow) each share is the stage's prior
seconds over the prior total, so one unit of fraction is worth that total in seconds; without
one the shares are the default stage weights and a unit is worth what this job has paid per
unit so far. Then::

    remaining = (end - f) * stage rate  +  (1 - end) * unit seconds * (1 + CARRY * (speed - 1))

where ``end`` is where the current stage's share runs out and the stage rate is the seconds per
unit over the stage's last ``WINDOW`` progress ticks (a slowdown part-way shows within a few
steps), pulled towards the unit seconds while the stage has few ticks. A sampler's first step
pays for its set-up, so the interval from entering a stage to its first tick leaves the rate
once a second tick is in. ``speed`` is that rate over the unit seconds: part of a slowdown (or
a speed-up) seen now carries into the stages ahead, which mostly run on the same GPU. A stage
entered again (a second sampler pass) only has what is left of its share.

Between updates the estimate counts down. Once the wait for the next progress exceeds the usual
gap (``STALL_MARGIN`` median tick intervals, or the stage's whole expected time when it reports
no ticks) every further second adds ``STALL_GROWTH`` seconds, so a stall lengthens the ETA
instead of freezing it. ``bench/eta.py`` scores this against linear extrapolation and tqdm's
EMA over several seeds; the constants were chosen on seeds 1-8 and checked on seeds 9-16.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import pairwise
from statistics import median
from types import MappingProxyType

from tower_progress.core.stages import DEFAULT_WEIGHTS

WINDOW = 4
"""Progress ticks the stage rate is measured over."""
SHRINK_TICKS = 1.0
"""Weight, in ticks, of the prior's unit seconds against a stage's own rate."""
SHRINK_TICKS_NO_PRIOR = 0.3
"""The same without a prior, where the job's pace so far is mostly model loading: a poor guide
to the stage's speed, so the stage's own ticks take over sooner."""
CARRY = 0.3
"""Part of the current stage's speed, relative to the unit seconds, expected in the stages
ahead."""
STALL_MARGIN = 1.5
"""A tick is overdue after this many median tick intervals."""
STALL_GROWTH = 1.0
"""Seconds added to the estimate per second of overdue stall."""
ROUNDING = 1e-9
"""Fraction growth up to this is float rounding in the tracker's sums, not progress."""

_DEFAULT_SHARES: Mapping[str, float] = MappingProxyType(
    {stage.value: share for stage, share in DEFAULT_WEIGHTS.items()}
)


class EtaEstimator:
    """Seconds left for one running job; feed it every progress update, ask at any time.

    ``prior`` maps stage name to expected seconds in that stage (see :func:`stage_prior`);
    it must hold finite, non-negative numbers. Stage names are those of
    :class:`~tower_progress.core.model.Stage`; an unknown name is its own stage with no share.
    """

    def __init__(self, prior: Mapping[str, float] | None = None) -> None:
        self._prior = _checked(prior or {})
        self._prior_total = expected_duration(self._prior)
        self._start: float | None = None
        self._start_fraction = 0.0
        self._fraction = 0.0
        self._last_t = 0.0
        self._since = 0.0  # when the fraction last grew or the stage last changed
        self._stage: str | None = None
        self._stage_f0 = 0.0
        self._ticks = 0
        self._points: deque[tuple[float, float]] = deque(maxlen=WINDOW + 1)
        self._gained: dict[str, float] = {}  # fraction done in finished visits of each stage

    def update(self, t: float, fraction: float, stage: str | None = None) -> None:
        """Record the job's overall ``fraction`` (0..1) at monotonic time ``t``.

        ``stage`` None keeps the current stage. A fraction not above the last one (a late
        report, or one that differs by rounding only) counts for its stage and time, not as
        progress. Raises ValueError for a non-finite value, a fraction outside 0..1 or a time
        earlier than the last update.
        """
        if not math.isfinite(t) or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"progress update needs finite t and 0 <= fraction <= 1, "
                f"got t={t!r} fraction={fraction!r}"
            )
        if self._start is None:
            self._start = self._last_t = self._since = t
            self._start_fraction = self._fraction = self._stage_f0 = fraction
            self._stage = stage
            self._points.append((t, fraction))
            return
        if t < self._last_t:
            raise ValueError(f"progress update went back in time: {t!r} < {self._last_t!r}")
        self._last_t = t
        grew = fraction > self._fraction + ROUNDING
        fraction = fraction if grew else self._fraction
        if stage is not None and stage != self._stage:
            self._enter(stage, t, fraction)
        elif grew:
            self._points.append((t, fraction))
            self._ticks += 1
        if grew:
            self._fraction = fraction
            self._since = t

    def remaining(self, t: float) -> float | None:
        """Seconds left as seen at monotonic time ``t``; None while nothing sensible can be
        said (no progress yet and no prior). Never negative."""
        if self._start is None:
            return self._prior_total if self._prior_total > 0 else None
        estimate = self._estimate(self._start)
        if estimate is None:
            return None
        left, gap = estimate
        waited = max(t, self._last_t) - self._since
        if waited <= gap:
            return left - waited
        return left - gap + STALL_GROWTH * (waited - gap)

    def _enter(self, stage: str, t: float, fraction: float) -> None:
        if self._stage is not None:
            self._gained[self._stage] = (
                self._gained.get(self._stage, 0.0) + fraction - self._stage_f0
            )
        self._stage = stage
        self._since = t
        self._stage_f0 = fraction
        self._ticks = 0
        self._points.clear()
        self._points.append((t, fraction))

    def _estimate(self, start: float) -> tuple[float, float] | None:
        """Seconds left as of the last progress, and how long after it a stall begins."""
        unit = self._unit_seconds(start)
        if unit is None:
            return None
        end = self._stage_end()
        rate = self._stage_rate()
        ahead = (1.0 - end) * unit
        if rate is None:
            stage_left = (end - self._fraction) * unit
            gap = (end - self._stage_f0) * unit if self._stage is not None else math.inf
        else:
            shrink = SHRINK_TICKS if self._prior_total > 0 else SHRINK_TICKS_NO_PRIOR
            trust = self._ticks / (self._ticks + shrink)
            pace = trust * rate + (1 - trust) * unit
            stage_left = (end - self._fraction) * pace
            ahead *= 1.0 + CARRY * (pace / unit - 1.0) if unit > 0 else 1.0
            times = [p[0] for p in self._points]
            gap = STALL_MARGIN * median(b - a for a, b in pairwise(times))
        left = stage_left + ahead
        return left, min(gap, left)

    def _unit_seconds(self, start: float) -> float | None:
        """Seconds one unit of fraction is expected to cost in the stages ahead."""
        if self._prior_total > 0:
            return self._prior_total
        done = self._fraction - self._start_fraction
        return (self._since - start) / done if done > 0 else None

    def _stage_end(self) -> float:
        """The fraction at which the current stage's share runs out."""
        if self._stage is None:
            return self._fraction
        if self._prior_total > 0:
            share = self._prior.get(self._stage, 0.0) / self._prior_total
        else:
            share = _DEFAULT_SHARES.get(self._stage, 0.0)
        share = max(share - self._gained.get(self._stage, 0.0), 0.0)
        return min(max(self._stage_f0 + share, self._fraction), 1.0)

    def _stage_rate(self) -> float | None:
        """Seconds per unit of fraction over the current stage's recent ticks, leaving out the
        interval from entering the stage to its first tick once there is another one."""
        entry_in_window = self._ticks < len(self._points)
        first = 1 if entry_in_window and self._ticks >= 2 else 0
        (t0, f0), (t1, f1) = self._points[first], self._points[-1]
        return (t1 - t0) / (f1 - f0) if f1 > f0 else None


def stage_prior(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Expected seconds per stage from earlier runs of one workflow: the lower tercile (the
    ``(n - 1) // 3``-th smallest) over the ``n`` runs that entered the stage.

    Slowdowns (throttling, another process on the GPU) and cold loads only ever lengthen a run,
    so the fast end of the runs is what the next one costs when nothing goes wrong; a median
    of a few runs is pulled up by a single slowed one. A run that skipped a stage (its loaders
    were cached, say) says nothing of what the stage costs when it runs: when the next run
    skips it too, the tracker counts those nodes done from the start. Raises ValueError for a
    non-finite or negative duration.
    """
    checked = [_checked(run) for run in runs]
    stages = sorted({stage for run in checked for stage in run})
    return {
        stage: _lower_tercile([run[stage] for run in checked if stage in run]) for stage in stages
    }


def _lower_tercile(values: Sequence[float]) -> float:
    return sorted(values)[(len(values) - 1) // 3]


def expected_duration(prior: Mapping[str, float]) -> float:
    """Seconds a whole run is expected to take under ``prior``.

    Raises ValueError for a non-finite or negative duration, or a total too large for a float.
    """
    total = sum(_checked(prior).values())
    if not math.isfinite(total):
        raise ValueError(f"prior total is not a finite number of seconds: {total!r}")
    return total


def _checked(seconds: Mapping[str, float]) -> dict[str, float]:
    for stage, value in seconds.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"stage {stage!r}: seconds must be finite and >= 0, got {value!r}")
    return {stage: float(value) for stage, value in seconds.items()}
