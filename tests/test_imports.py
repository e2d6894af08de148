"""The import graph keeps its layers: adapters never reach back up, and the pure core does no I/O.

Every module under valshi_x/ is parsed with `ast` (not imported), and every import it makes counts, also those
inside functions and under `if TYPE_CHECKING:`: a dependency is a dependency, whenever it is loaded.

- The adapters (valshi_x.kalshi.*, valshi_x.x.*) talk to the outside world for the rest; they take plain
  arguments and never import the composition (daemon, config, wiring), the stages (pipeline, intake, sink,
  telemetry) or recovery, and they do not know each other: kalshi.* never imports x.*, nor x.* kalshi.*.
- The pure core (trades, whales, the recovery planner and gap watch, health, decode, sanitize, the pipeline,
  x.text, markets) imports no event loop and no network, database or process library.

`KNOWN_EXCEPTIONS` lists the edges that break a rule today, each with what removes it. An exception that is no
longer needed fails the test too, so the rule tightens by itself once the edge is gone.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "valshi_x"

ADAPTERS = ("valshi_x.kalshi", "valshi_x.x")
# What no adapter imports: the composition root and its factories, the stages and recovery.
ABOVE_ADAPTERS = (
    "valshi_x.__main__",
    "valshi_x.daemon",
    "valshi_x.config",
    "valshi_x.wiring",
    "valshi_x.runmode",
    "valshi_x.check",
    "valshi_x.pipeline",
    "valshi_x.intake",
    "valshi_x.sink",
    "valshi_x.telemetry",
    "valshi_x.supervisor",
    "valshi_x.recovery",
)
PURE = (
    "valshi_x.trades",
    "valshi_x.whales",
    "valshi_x.recovery.planner",
    "valshi_x.recovery.gapwatch",
    "valshi_x.health",
    "valshi_x.decode",
    "valshi_x.sanitize",
    "valshi_x.pipeline",
    "valshi_x.x.text",
    "valshi_x.markets",
    "valshi_x.x.filters",
)
IO_LIBRARIES = ("asyncio", "aiohttp", "websockets", "tweepy", "sqlite3", "socket", "subprocess", "threading")

# (importer, imported) -> why it is allowed for now, and what removes it.
KNOWN_EXCEPTIONS: Mapping[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, known: Iterable[str] = ()) -> set[str]:
    """Every module a source imports, anywhere in it; `from pkg import mod` counts as `pkg.mod` when that is a
    module of `known`."""
    modules = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    return {name: imports_of(path.read_text(encoding="utf-8"), paths) for name, path in paths.items()}


def _within(name: str, prefixes: Iterable[str]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def violations(edges: Mapping[str, set[str]]) -> list[tuple[str, str, str]]:
    """Every (importer, imported, rule) that breaks a layer, known exceptions included."""
    found = []
    for importer, imported_all in sorted(edges.items()):
        adapter = _within(importer, ADAPTERS)
        pure = importer in PURE
        for imported in sorted(imported_all):
            if adapter is not None:
                if _within(imported, ABOVE_ADAPTERS):
                    found.append((importer, imported, "an adapter imports the layer above it"))
                other = _within(imported, ADAPTERS)
                if other is not None and other != adapter:
                    found.append((importer, imported, "one adapter imports another"))
            if pure and _within(imported, IO_LIBRARIES):
                found.append((importer, imported, "a pure module imports an I/O library"))
    return found


def test_the_package_keeps_its_layers() -> None:
    edges = graph()
    assert {"valshi_x.daemon", "valshi_x.kalshi.stream", "valshi_x.x.poster", "valshi_x.recovery.planner"} <= set(edges)
    broken = [v for v in violations(edges) if (v[0], v[1]) not in KNOWN_EXCEPTIONS]
    assert broken == [], "\n".join(f"{a} -> {b}: {rule}" for a, b, rule in broken)


def test_every_known_exception_is_still_needed() -> None:
    found = {(a, b) for a, b, _ in violations(graph())}
    stale = sorted(set(KNOWN_EXCEPTIONS) - found)
    assert stale == [], f"no longer imported, so forbidden from now on: delete from KNOWN_EXCEPTIONS: {stale}"


def test_the_rules_catch_each_kind_of_edge(tmp_path: Path) -> None:
    """The checker itself: a tree that breaks each rule once is caught once per break."""
    package = tmp_path / "valshi_x"
    files = {
        "__init__.py": "",
        "config.py": "",
        "trades.py": "import asyncio\n",
        "kalshi/__init__.py": "",
        "kalshi/rest.py": "from valshi_x import config\nfrom valshi_x.x.text import MarketLabel\n",
        "x/__init__.py": "",
        "x/text.py": "",
        "x/poster.py": "def later() -> None:\n    from valshi_x.kalshi import rest\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text, encoding="utf-8")
    assert violations(graph(package)) == [
        ("valshi_x.kalshi.rest", "valshi_x.config", "an adapter imports the layer above it"),
        ("valshi_x.kalshi.rest", "valshi_x.x.text", "one adapter imports another"),
        ("valshi_x.trades", "asyncio", "a pure module imports an I/O library"),
        ("valshi_x.x.poster", "valshi_x.kalshi", "one adapter imports another"),
        ("valshi_x.x.poster", "valshi_x.kalshi.rest", "one adapter imports another"),
    ]
