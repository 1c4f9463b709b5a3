"""EtaEstimator, stage_prior and expected_duration on plain data with known answers.

Each case is a job's progress updates ``(t, fraction, stage)`` and the seconds left that the
estimator must answer at given times, worked out by hand (comments show the sums) and compared
to 1e-9, so a wrong weighting, window or countdown shows as a wrong number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from tower_progress.core.eta import EtaEstimator, expected_duration, stage_prior

Update = tuple[float, float, str | None]


@dataclass(frozen=True)
class Case:
    name: str
    prior: Mapping[str, float] | None
    updates: Sequence[Update]
    expected: Sequence[tuple[float, float | None]]
    """(t, seconds left) after all updates."""


def _ticks(stage: str, t0: float, f0: float, dt: float, df: float, n: int) -> list[Update]:
    return [(t0 + i * dt, f0 + i * df, stage) for i in range(1, n + 1)]


CASES = [
    Case(
        "nothing known yet",
        None,
        [(100.0, 0.0, "loading")],
        [(100.0, None), (130.0, None)],
    ),
    Case(
        "constant velocity, no prior: exact, then counting down until a tick is overdue",
        None,
        [(0.0, 0.0, "sampling"), *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4)],
        # 80 s per unit; sampling's default share ends at 0.65, the rest costs the same.
        [(40.0, 40.0), (45.0, 35.0), (55.0, 25.0)],
    ),
    Case(
        "a slowdown part-way, 2 ticks in: the last 4 ticks hold 2 fast and 2 slow ones",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.025, 8),
            *_ticks("sampling", 80.0, 0.2, 20.0, 0.025, 2),
        ],
        # window 600 s/unit at 10/10.3 trust against the job's 480: pace 61440/103, 0.4 of
        # sampling left at it; then 0.35 at 480, carrying 0.3 of pace/480 - 1 = 25/103
        [(120.0, 0.4 * 61440.0 / 103.0 + 0.35 * 480.0 * (1.0 + 0.3 * 25.0 / 103.0))],
    ),
    Case(
        "a slowdown part-way, 4 ticks in: the last 4 ticks are all slow",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.025, 8),
            *_ticks("sampling", 80.0, 0.2, 20.0, 0.025, 4),
        ],
        # window 800 s/unit at 12/12.3 trust against the job's 1600/3: pace 97600/123 (61/41
        # of the job's); 0.35 of sampling left at it, then 0.35 at 1600/3 * (1 + 0.3 * 20/41)
        [(160.0, 0.35 * 97600.0 / 123.0 + 0.35 * 1600.0 / 3.0 * 47.0 / 41.0)],
    ),
    Case(
        "a stall beyond 1.5 median ticks lengthens the estimate",
        None,
        [(0.0, 0.0, "sampling"), *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4)],
        [(56.0, 26.0), (65.0, 35.0), (100.0, 70.0)],
    ),
    Case(
        "prior only: its total before the job starts",
        {"loading": 10.0, "sampling": 30.0},
        [],
        [(0.0, 40.0), (1000.0, 40.0)],
    ),
    Case(
        "prior only: counts down from the start, then grows once past the expected end",
        {"loading": 10.0, "sampling": 30.0},
        [(100.0, 0.0, None)],
        [(100.0, 40.0), (130.0, 10.0), (140.0, 0.0), (150.0, 10.0)],
    ),
    Case(
        "running exactly as the prior says",
        {"loading": 10.0, "sampling": 30.0},
        [
            (0.0, 0.0, "loading"),
            (10.0, 0.25, "sampling"),
            *_ticks("sampling", 10.0, 0.25, 5.0, 0.125, 2),
        ],
        [(20.0, 20.0), (22.0, 18.0)],
    ),
    Case(
        "twice as slow as the prior: the stage's rate outweighs the prior as ticks come in",
        {"loading": 10.0, "sampling": 30.0},
        [
            (0.0, 0.0, "loading"),
            (10.0, 0.25, "sampling"),
            *_ticks("sampling", 10.0, 0.25, 10.0, 0.125, 2),
        ],
        # rate 80 s/unit, prior 40 s/unit, trust 2/3: 0.5 * (2/3 * 80 + 1/3 * 40)
        [(30.0, 100.0 / 3.0)],
    ),
    Case(
        "a stage's share never runs past the end of the job",
        None,
        [(0.0, 0.0, "loading"), (10.0, 0.5, "sampling"), (20.0, 0.75, "sampling")],
        # rate 40 at 1/1.3 trust against the job's 80/3 s/unit: 0.25 left at 480/13; sampling's
        # 0.65 share is cut at 1.0, so nothing is ahead
        [(20.0, 120.0 / 13.0)],
    ),
    Case(
        "entering a stage is progress even when the fraction does not move",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4),
            (50.0, 0.5, "decoding"),
        ],
        # 100 s per unit: decoding's 0.08 share in 8 s, the last 0.42 in 42 s; then 2 s overdue
        [(50.0, 50.0), (55.0, 45.0), (60.0, 44.0)],
    ),
    Case(
        "a stage without ticks expects its prior share, then grows past it",
        {"sampling": 30.0, "decoding": 10.0},
        [(0.0, 0.0, "sampling"), (30.0, 0.75, "decoding")],
        [(30.0, 10.0), (38.0, 2.0), (40.0, 0.0), (45.0, 5.0)],
    ),
    Case(
        "a stage entered again only has what is left of its share",
        {"sampling": 40.0, "decoding": 10.0},
        # The first pass's last step shows as the jump when decoding starts; the second pass
        # runs at 100 s per unit against the prior's 50.
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 5.0, 0.1, 3),
            (20.0, 0.4, "decoding"),
            (25.0, 0.5, "sampling"),
            *_ticks("sampling", 25.0, 0.5, 10.0, 0.1, 2),
        ],
        # 0.2 left of sampling at 2/3 * 100 + 1/3 * 50 = 250/3 (5/3 of the prior's pace), then
        # 0.1 of decoding at 50 carrying 0.3 of that: 50/3 + 5 * (1 + 0.3 * 2/3)
        [(45.0, 68.0 / 3.0)],
    ),
    Case(
        "a slow first step leaves the rate once a second tick is in; a faster stage carries",
        {"sampling": 40.0, "decoding": 10.0},
        [(0.0, 0.0, "sampling"), (8.0, 0.1, None), (12.0, 0.2, None), (16.0, 0.3, None)],
        # rate 8 s / 0.2 = 40 (not 16 / 0.3) at 3/4 trust against the prior's 50: pace 42.5,
        # 0.5 of sampling left at it; then 0.2 at 50 * (1 + 0.3 * (42.5 / 50 - 1))
        [(16.0, 0.5 * 42.5 + 0.2 * 50.0 * 0.955)],
    ),
    Case(
        "no prior, a stage without ticks: default share at the job's pace so far",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.25, 2),
            (20.0, 0.5, "decoding"),
        ],
        # 40 s per unit; decoding's default share 0.08 takes 3.2 s, then 0.42 more units.
        [(20.0, 20.0), (23.0, 17.0), (30.0, 23.6)],
    ),
    Case(
        "an unknown stage has no share: everything left goes at the job's pace",
        None,
        [(0.0, 0.0, "upscaling"), (10.0, 0.25, "upscaling")],
        [(10.0, 30.0)],
    ),
    Case(
        "a prior of zeros is no prior",
        {"sampling": 0.0},
        [(0.0, 0.0, "sampling"), *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4)],
        [(40.0, 40.0)],
    ),
    Case(
        "a late, lower fraction changes nothing",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4),
            (44.0, 0.25, "sampling"),
        ],
        [(45.0, 35.0), (55.0, 25.0)],
    ),
    Case(
        "a late, lower fraction that names a new stage enters it at the known fraction",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4),
            (40.0, 0.25, "decoding"),
        ],
        # 80 s per unit; decoding's share 0.08 is due in 6.4 s, then the stall grows it.
        [(40.0, 40.0), (46.0, 34.0), (55.0, 42.2)],
    ),
    Case(
        "growth by float rounding is not progress",
        None,
        [
            (0.0, 0.0, "sampling"),
            *_ticks("sampling", 0.0, 0.0, 10.0, 0.125, 4),
            (41.0, 0.5 + 1e-12, "sampling"),
        ],
        [(45.0, 35.0), (55.0, 25.0)],
    ),
    Case(
        "the stage of an update without one is kept",
        None,
        [(0.0, 0.0, "sampling"), (10.0, 0.125, None), (20.0, 0.25, None)],
        [(20.0, 60.0)],
    ),
    Case(
        "cached nodes count as done, not as time spent",
        None,
        [
            (0.0, 0.25, None),
            (0.0, 0.25, "sampling"),
            *_ticks("sampling", 0.0, 0.25, 10.0, 0.125, 2),
        ],
        [(20.0, 40.0)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_remaining(case: Case) -> None:
    eta = EtaEstimator(case.prior)
    for t, fraction, stage in case.updates:
        eta.update(t, fraction, stage)
    got = [(t, eta.remaining(t)) for t, _ in case.expected]
    want = [
        (t, pytest.approx(left, abs=1e-9) if left is not None else None)
        for t, left in case.expected
    ]
    assert got == want


def test_a_run_that_follows_its_prior_keeps_one_finish_time() -> None:
    """Stage by stage, with node-granular stages and per-step sampling ticks, the predicted
    finish (t + remaining) never moves when the job takes exactly its prior's seconds."""
    prior = {"loading": 10.0, "preparing": 5.0, "sampling": 40.0, "decoding": 10.0, "encoding": 5.0}
    total = 70.0
    eta = EtaEstimator(prior)
    eta.update(1000.0, 0.0, None)
    t, f = 1000.0, 0.0
    finishes = [1000.0 + (eta.remaining(1000.0) or 0.0)]
    for stage, seconds, ticks in (
        ("loading", 10.0, 1),
        ("preparing", 5.0, 1),
        ("sampling", 40.0, 20),
        ("decoding", 10.0, 1),
        ("encoding", 5.0, 1),
    ):
        eta.update(t, f, stage)
        for _ in range(ticks):
            for probe in (t + 0.25 * seconds / ticks, t + 0.75 * seconds / ticks):
                finishes.append(probe + (eta.remaining(probe) or 0.0))
            t += seconds / ticks
            f += seconds / ticks / total
            if ticks > 1:
                eta.update(t, min(f, 0.999), stage)
    assert finishes == [pytest.approx(1070.0, abs=1e-9)] * len(finishes)


def test_never_negative_nor_nan_on_random_jobs() -> None:
    rng = random.Random(7)
    stages = ("loading", "preparing", "sampling", "decoding", "encoding", "processing", None)
    for _ in range(200):
        prior = (
            {s: rng.uniform(0.0, 20.0) for s in stages[:5] if rng.random() < 0.7}
            if rng.random() < 0.5
            else None
        )
        eta = EtaEstimator(prior)
        t, f = rng.uniform(0.0, 1e6), 0.0
        for _ in range(rng.randint(1, 60)):
            t += rng.choice((0.0, rng.uniform(0.0, 5.0), rng.uniform(0.0, 300.0)))
            f = min(1.0, f + rng.choice((0.0, rng.uniform(0.0, 0.2))))
            eta.update(t, rng.choice((f, f, rng.uniform(0.0, f))), rng.choice(stages))
            for probe in (t - 1.0, t, t + rng.uniform(0.0, 1000.0)):
                left = eta.remaining(probe)
                assert left is None or (math.isfinite(left) and left >= 0.0)


@pytest.mark.parametrize(
    ("t", "fraction"),
    [(math.nan, 0.5), (math.inf, 0.5), (1.0, math.nan), (1.0, -0.01), (1.0, 1.01)],
)
def test_bad_update_is_refused(t: float, fraction: float) -> None:
    eta = EtaEstimator()
    with pytest.raises(ValueError, match="finite t and 0 <= fraction <= 1"):
        eta.update(t, fraction, "sampling")
    assert eta.remaining(0.0) is None


def test_time_going_back_is_refused_and_changes_nothing() -> None:
    eta = EtaEstimator()
    eta.update(10.0, 0.0, "sampling")
    eta.update(20.0, 0.25, "sampling")
    before = eta.remaining(20.0)
    with pytest.raises(ValueError, match="back in time"):
        eta.update(19.0, 0.5, "sampling")
    assert eta.remaining(20.0) == before


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_bad_prior_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="'sampling': seconds must be finite and >= 0"):
        EtaEstimator({"sampling": seconds})
    with pytest.raises(ValueError, match="'sampling': seconds must be finite and >= 0"):
        stage_prior([{"loading": 1.0}, {"sampling": seconds}])
    with pytest.raises(ValueError, match="'sampling': seconds must be finite and >= 0"):
        expected_duration({"sampling": seconds})


def test_prior_total_too_large_is_refused() -> None:
    with pytest.raises(ValueError, match="prior total is not a finite number"):
        EtaEstimator({"sampling": 1e308, "decoding": 1e308})


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([], {}),
        ([{"sampling": 12.5}], {"sampling": 12.5}),
        ([{"sampling": 10.0}, {"sampling": 20.0}], {"sampling": 10.0}),
        (
            [
                {"loading": 20.0, "sampling": 10.0},
                {"sampling": 12.0},
                {"loading": 2.0, "sampling": 11.0},
            ],
            {"loading": 2.0, "sampling": 10.0},
        ),
        (
            [
                {"sampling": 10.0},
                {"sampling": 30.0},
                {"sampling": 11.0},
                {"sampling": 200.0},
            ],
            {"sampling": 11.0},
        ),
        (
            [
                {"sampling": 10.0},
                {"sampling": 30.0},
                {"sampling": 11.0},
                {"sampling": 200.0},
                {"sampling": 12.0},
            ],
            {"sampling": 11.0},
        ),
        (
            [{"sampling": float(s)} for s in (17, 11, 13, 30, 10, 12, 16)],
            {"sampling": 12.0},
        ),
    ],
    ids=[
        "no runs",
        "one run",
        "two runs: the faster",
        "cached loaders: over the runs that loaded",
        "four runs: the second fastest",
        "five runs: the second fastest, a slow outlier ignored",
        "seven runs: the third fastest",
    ],
)
def test_stage_prior(runs: list[dict[str, float]], expected: dict[str, float]) -> None:
    assert stage_prior(runs) == expected


@pytest.mark.parametrize(
    ("prior", "expected"),
    [({}, 0.0), ({"loading": 1.5, "sampling": 2.5}, 4.0), ({"decoding": 0.25}, 0.25)],
)
def test_expected_duration(prior: dict[str, float], expected: float) -> None:
    assert expected_duration(prior) == expected
