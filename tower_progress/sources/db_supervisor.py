"""Keeps the embedded PostgreSQL running for as long as the daemon runs.

PostgreSQL that cannot write its data directory (the state disk gone read-only, full, or
failing) PANICs. Its postmaster may exit, or, as PostgreSQL 18 does when crash recovery
PANICs too, stay up refusing every connection ("in recovery mode") even after the disk is
writable again. Nothing else restarts the embedded server, so ``EmbeddedSupervisor`` watches
it: the postmaster process every ``interval`` seconds and a connection on the same beat. A
postmaster that is gone, or one that has refused connections for ``unresponsive_after``
seconds (long enough for a real crash recovery), is killed and started again with capped,
jittered backoff, reset once it is back. The outage and the recovery are logged once each;
the database sources notice on their own and reconnect to the same DSN.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg

from tower_progress.clock import sleep_or_stop, wait_for_tick
from tower_progress.sources.db_embedded import EmbeddedPostgres, EmbeddedPostgresError
from tower_progress.sources.db_retry import Backoff, describe

log = logging.getLogger(__name__)

APPLICATION_NAME = "tower-progress supervisor"
_UNREACHABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


class EmbeddedSupervisor:
    """Restarts ``server`` (started on ``data_dir`` with ``dsn``) when it dies or hangs.

    Run ``run(stop)`` as a task; it returns once ``stop`` is set and never starts a server
    after that (a start in flight is finished and left for the caller's ``server.stop()``).
    """

    def __init__(
        self,
        server: EmbeddedPostgres,
        data_dir: Path,
        dsn: str,
        *,
        interval: float = 5.0,
        unresponsive_after: float = 30.0,
        probe_timeout: float = 5.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
    ) -> None:
        if interval <= 0 or unresponsive_after < interval or probe_timeout <= 0:
            raise ValueError("need interval > 0, unresponsive_after >= interval, probe_timeout > 0")
        self._server = server
        self._data_dir = data_dir
        self._dsn = dsn
        self._interval = interval
        self._unresponsive_after = unresponsive_after
        self._probe_timeout = probe_timeout
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        refusing_since: float | None = None
        while not await wait_for_tick(stop, self._interval):
            if not self._server.alive():
                reason = "its postmaster exited"
            else:
                problem = await self._probe()
                if problem is None:
                    refusing_since = None
                    continue
                refusing_since = refusing_since if refusing_since is not None else loop.time()
                refused_for = loop.time() - refusing_since
                if refused_for < self._unresponsive_after:
                    log.debug("embedded PostgreSQL refused a connection: %s", problem)
                    continue
                reason = f"it refused connections for {refused_for:.0f} s ({problem})"
            log.warning("embedded PostgreSQL is down: %s; restarting it", reason)
            refusing_since = None
            await asyncio.to_thread(self._server.kill)
            await self._restart(stop)

    async def _probe(self) -> str | None:
        """None when the server accepts a connection, else why not (one line)."""
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._probe_timeout,
                server_settings={"application_name": APPLICATION_NAME},
            )
        except _UNREACHABLE as exc:
            return describe(exc)
        conn.terminate()
        return None

    async def _restart(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._server.start, self._data_dir)
            except EmbeddedPostgresError as exc:
                failures += 1
                if failures == 1:
                    log.warning("embedded PostgreSQL did not restart: %s; retrying", exc)
                else:
                    log.debug("embedded PostgreSQL did not restart (attempt %d): %s", failures, exc)
                await sleep_or_stop(stop, self._backoff.next_delay())
                continue
            self._backoff.reset()
            log.info(
                "embedded PostgreSQL restarted%s",
                f" after {failures} failed attempts" if failures else "",
            )
            return
