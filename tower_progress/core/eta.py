"""How long a running job has left, from its progress fraction, its stage and its history.

The fraction ``f`` is the tracker's: each stage owns a share of 0..1. With a prior (stage name ->
expected seconds, from earlier runs of the same workflow) each share is the stage's prior
seconds over the prior total, so one unit of fraction is worth that total in seconds; without
one the shares are the default stage weights and a unit is worth what this job has paid per
unit so far. Then::

    remaining = (end - f) * stage rate  +  (1 - end) * unit seconds

where ``end`` is where the current stage's share runs out and the stage rate is the seconds per
unit over the stage's last ``WINDOW`` progress ticks (per-step jitter averages out, a slowdown
part-way shows within a few steps), pulled towards the unit seconds while the stage has few
ticks. A stage entered again (a second sampler pass) only has what is left of its share.

Between updates the estimate counts down. Once the wait for the next progress exceeds the usual
gap (``STALL_MARGIN`` median tick intervals, or the stage's whole expected time when it reports
no ticks) every further second adds ``STALL_GROWTH`` seconds, so a stall lengthens the ETA
instead of freezing it. ``bench/eta.py`` scores this against linear extrapolation and tqdm's
EMA; the constants were tuned there on one seed and checked on another.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from itertools import pairwise
from statistics import median
from types import MappingProxyType

from tower_progress.core.stages import DEFAULT_WEIGHTS

WINDOW = 8
"""Progress ticks the stage rate is measured over."""
SHRINK_TICKS = 1.0
"""Weight, in ticks, of the unit seconds against a stage's own rate."""
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
        if rate is None:
            stage_left = (end - self._fraction) * unit
            gap = (end - self._stage_f0) * unit if self._stage is not None else math.inf
        else:
            trust = self._ticks / (self._ticks + SHRINK_TICKS)
            stage_left = (end - self._fraction) * (trust * rate + (1 - trust) * unit)
            times = [p[0] for p in self._points]
            gap = STALL_MARGIN * median(b - a for a, b in pairwise(times))
        left = stage_left + (1.0 - end) * unit
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
        """Seconds per unit of fraction over the current stage's recent ticks."""
        (t0, f0), (t1, f1) = self._points[0], self._points[-1]
        return (t1 - t0) / (f1 - f0) if f1 > f0 else None


def stage_prior(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Expected seconds per stage from earlier runs of one workflow: the median over runs,
    a stage a run never entered (its loaders were cached, say) counting as 0 s for it.

    Raises ValueError for a non-finite or negative duration.
    """
    checked = [_checked(run) for run in runs]
    stages = sorted({stage for run in checked for stage in run})
    return {stage: median(run.get(stage, 0.0) for run in checked) for stage in stages}


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
