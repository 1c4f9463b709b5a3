"""Pure parts of the database source: row validation (hostile production-table values become
exact JobRows, never a crash) and history entries.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest

from tower_progress.core.model import JobFinished, JobRow
from tower_progress.sources.db_history_entries import (
    Sample,
    decode_cursor,
    encode_cursor,
    make_finished,
    make_sample,
)
from tower_progress.sources.db_rows import FieldProblem, ProblemLog, validate_row
from tower_progress.sources.db_table import SchemaError, check_column_map, quote_ident

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T0_EPOCH = 1772366400.0


def test_clean_row_is_converted_exactly() -> None:
    row, problems = validate_row(
        {
            "id": 42,
            "status": "rendering",
            "comfyui_job_id": "0f3c",
            "title": "Episode 3",
            "total_frames": 120,
            "created_at": T0,
            "updated_at": T0 + timedelta(seconds=1.5),
        }
    )
    assert problems == ()
    assert row == JobRow(
        id="42",
        status="rendering",
        prompt_id="0f3c",
        title="Episode 3",
        total_frames=120,
        created_at=T0_EPOCH,
        updated_at=T0_EPOCH + 1.5,
    )


def test_hostile_values_become_none_with_one_problem_each() -> None:
    row, problems = validate_row(
        {
            "id": "job-abc",
            "status": None,
            "comfyui_job_id": 17,
            "title": b"bytes",
            "total_frames": -5,
            "created_at": "yesterday",
            "updated_at": datetime.max,
        }
    )
    assert row == JobRow(id="job-abc", status=None)
    assert [(p.field, p.reason) for p in problems] == [
        ("status", "NULL status"),
        ("comfyui_job_id", "not text"),
        ("title", "not text"),
        ("total_frames", "outside 1..100000"),
        ("created_at", "not an ISO-8601 timestamp"),
        ("updated_at", "outside 2000..2100"),
    ]


@pytest.mark.parametrize(
    ("frames", "expected", "reason"),
    [
        (10**12, None, "outside 1..100000"),
        (100_000, 100_000, None),
        (100_001, None, "outside 1..100000"),
        (0, None, None),
        (24.0, 24, None),
        (Decimal("48"), 48, None),
        (2.5, None, "not a whole number"),
        (float("nan"), None, "not a whole number"),
        (True, None, "not a number"),
        ("120", None, "not a number"),
        (None, None, None),
    ],
)
def test_total_frames(frames: object, expected: int | None, reason: str | None) -> None:
    row, problems = validate_row({"id": 1, "status": "queued", "total_frames": frames})
    assert row is not None
    assert row.total_frames == expected
    assert [p.reason for p in problems] == ([reason] if reason else [])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (7, "7"),
        (UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (Decimal("9"), "9"),
        (3.0, "3"),
        ("a b", "a b"),
    ],
)
def test_any_scalar_id_becomes_a_string(raw: object, expected: str) -> None:
    row, problems = validate_row({"id": raw, "status": "done"})
    assert row == JobRow(id=expected, status="done")
    assert problems == ()


@pytest.mark.parametrize("raw", [None, "", "  ", True, b"x", float("inf"), [1]])
def test_row_without_usable_id_is_reported(raw: object) -> None:
    row, problems = validate_row({"id": raw, "status": "done"})
    assert row is None
    assert [(p.field, p.reason) for p in problems] == [("id", "no usable id; row skipped")]


def test_unknown_status_is_kept_verbatim_and_odd_statuses_reported() -> None:
    assert validate_row({"id": 1, "status": "Frobnicating"})[0] == JobRow("1", "Frobnicating")
    for raw, reason in ((3, "status is not text"), ("", "empty status")):
        row, problems = validate_row({"id": 1, "status": raw})
        assert row == JobRow("1", None)
        assert [p.reason for p in problems] == [reason]


def test_timestamps_naive_is_utc_iso_text_and_epoch_numbers() -> None:
    naive = T0.replace(tzinfo=None)
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    cases: list[tuple[object, float | None]] = [
        (naive, T0_EPOCH),
        (plus_two, T0_EPOCH),
        ("2026-03-01T12:00:00Z", T0_EPOCH),
        (T0_EPOCH, T0_EPOCH),
        (T0_EPOCH * 1000, None),
        (datetime.min, None),
    ]
    for raw, expected in cases:
        row, _ = validate_row({"id": 1, "status": "x", "created_at": raw})
        assert row is not None
        assert row.created_at == expected, raw


def test_blank_prompt_id_is_null_and_uuid_prompt_id_is_text() -> None:
    row, problems = validate_row({"id": 1, "status": "x", "comfyui_job_id": "  "})
    assert row == JobRow("1", "x") and problems == ()
    uid = UUID("00000000-0000-0000-0000-00000000000a")
    row, _ = validate_row({"id": 1, "status": "x", "comfyui_job_id": uid})
    assert row is not None and row.prompt_id == str(uid)


def test_problem_log_reports_each_job_and_field_once(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.problems")
    problems = ProblemLog(logger, table="public.jobs", capacity=2)
    bad = [FieldProblem("total_frames", "-5", "outside 1..100000")]
    with caplog.at_level(logging.WARNING, logger="test.problems"):
        problems.report("1", bad)
        problems.report("1", bad)
        problems.report("2", bad)
        problems.report("3", bad)
        problems.report("1", bad)
    assert [r.getMessage() for r in caplog.records] == [
        f"public.jobs: job {j}: total_frames=-5: outside 1..100000; using null"
        for j in ("1", "2", "3", "1")
    ]


def test_identifiers_are_quoted_and_column_map_checked() -> None:
    assert quote_ident('we"ird name') == '"we""ird name"'
    with pytest.raises(SchemaError, match="invalid SQL identifier"):
        quote_ident("")
    mapped = check_column_map({"id": "job_id"}, ("id", "status"), "database.columns")
    assert mapped == {"id": "job_id", "status": "status"}
    with pytest.raises(SchemaError, match=r"^database\.columns: unknown field 'titel'"):
        check_column_map({"titel": "x"}, ("id", "title"), "database.columns")


def test_history_entries_are_checked_before_buffering() -> None:
    assert make_sample("j", T0_EPOCH, 12.5, "sampling", 3) == Sample("j", T0, 12.5, "sampling", 3)
    assert make_sample("j", T0_EPOCH, None, None, None) == Sample("j", T0, None, None, None)
    assert [
        make_sample(*bad)
        for bad in (
            ("", T0_EPOCH, 1.0, None, None),
            ("j", 1e300, 1.0, None, None),
            ("j", "2026-03-01", 1.0, None, None),
            ("j", T0_EPOCH, float("inf"), None, None),
            ("j", T0_EPOCH, 1.0, 7, None),
            ("j", T0_EPOCH, 1.0, None, True),
        )
    ] == [
        "no job id",
        "bad time 1e+300",
        "bad time '2026-03-01'",
        "bad percent inf",
        "bad stage 7",
        "bad step True",
    ]


def test_finished_entry_keeps_good_stages_and_defaults_missing_times() -> None:
    event = JobFinished(
        job={"id": "j1", "state": "failed", "started_at": T0_EPOCH, "error": {"message": "oom"}},
        fingerprint="fp",
        stage_seconds={"loading": 2.5, "sampling": float("nan"), "decoding": -1.0},
    )
    entry, problems = make_finished(event, now=T0_EPOCH + 90)
    assert entry is not None
    assert entry.stage_seconds == (("loading", 2.5),)
    assert (entry.state, entry.finished_at, entry.duration_s) == (
        "failed",
        T0 + timedelta(seconds=90),
        90.0,
    )
    assert entry.error == '{"message": "oom"}'
    assert problems == ["stage sampling has bad seconds nan", "stage decoding has bad seconds -1.0"]
    assert make_finished(JobFinished(job={"state": "completed"}, fingerprint=None), 0.0) == (
        None,
        ["finished job without an id: {'state': 'completed'}"],
    )


def test_cursor_round_trips_exactly_and_rejects_garbage() -> None:
    when = T0 + timedelta(microseconds=7)
    assert decode_cursor(encode_cursor(when, "job:with:colons")) == (when, "job:with:colons")
    for garbage in ("", "%%%", "bm90LWEtY3Vyc29y"):
        with pytest.raises(ValueError, match="invalid cursor"):
            decode_cursor(garbage)
