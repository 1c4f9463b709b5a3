"""Fixtures shared across test modules: one embedded PostgreSQL per session."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tower_progress.sources.database import EmbeddedPostgres, migrate


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL with our migrations and the reference production_jobs table."""
    base = Path(tempfile.mkdtemp(prefix="tp-db-test-"))
    server = EmbeddedPostgres(runtime_dir=base / "run")
    dsn = server.start(base / "pgdata")
    asyncio.run(migrate(dsn))
    yield dsn
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def home() -> Iterator[Path]:
    """A short private directory under /tmp for a daemon's home and state (the embedded
    database's socket path must stay under 108 bytes, which pytest's tmp_path does not
    promise)."""
    path = Path(tempfile.mkdtemp(prefix="tp-home-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
