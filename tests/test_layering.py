"""Import rules of DESIGN §3, checked on the source: the core stays pure."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "tower_progress"
FORBIDDEN_IN_CORE = {"asyncio", "socket", "threading", "subprocess", "select", "selectors"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_only_the_standard_library_and_core() -> None:
    offenders = {}
    for path in sorted((PACKAGE / "core").glob("*.py")):
        bad = sorted(
            name
            for name in imports(path)
            if not name.startswith("tower_progress.core")
            and (
                name.split(".")[0] not in sys.stdlib_module_names
                or name.split(".")[0] in FORBIDDEN_IN_CORE
            )
        )
        if bad:
            offenders[path.name] = bad
    assert offenders == {}


def test_core_never_reads_the_clock() -> None:
    for path in sorted((PACKAGE / "core").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for call in ("time.time(", "time.monotonic(", "datetime.now(", "datetime.utcnow("):
            assert call not in text, f"{path.name} reads the clock with {call}"


def test_sources_and_web_never_import_each_other() -> None:
    for layer, other in (("sources", "tower_progress.web"), ("web", "tower_progress.sources")):
        for path in sorted((PACKAGE / layer).glob("*.py")):
            assert not any(n.startswith(other) for n in imports(path)), path.name
