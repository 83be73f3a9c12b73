"""Imports point one way (docs/architecture.md): evaluations ← infra ← middleware ← actors ← app, and
the executor stands on evaluations and infra alone. No two files, and no two packages, import each other.

Check by hand: `.venv/bin/python -m tests.unit.import_graph`.
"""

from __future__ import annotations

import subprocess
import sys

from tests.unit.import_graph import PACKAGES, ROOT, cycles, edges, package_edges, package_of

#: What each package may import of ours. `tasks` and `retry_config` (the Celery service's
#: import names) stand on top and may import anything.
MAY_IMPORT: dict[str, set[str]] = {
    "evaluations": set(),
    "infra": {"evaluations"},
    "middleware": {"evaluations", "infra"},
    "actors": {"evaluations", "infra", "middleware"},
    "executor": {"evaluations", "infra"},
    "app": {"evaluations", "infra", "middleware", "actors", "executor"},
}


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = {
        f"{a} -> {b}"
        for a, bs in edges().items()
        for b in bs
        if package_of(a) in MAY_IMPORT and package_of(b) not in MAY_IMPORT[package_of(a)] | {package_of(a)}
    }
    assert not wrong, f"imports pointing the wrong way: {sorted(wrong)}"
    assert set(MAY_IMPORT) == set(PACKAGES)


def test_no_two_files_import_each_other_even_around_a_loop() -> None:
    assert cycles(edges()) == []


def test_no_two_packages_import_each_other() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in package_edges(edges()):
        graph.setdefault(a, set()).add(b)
    assert cycles(graph) == []


def test_the_graph_reader_sees_imports_and_finds_a_planted_cycle() -> None:
    """The checks above would pass on an empty graph: this one makes sure they look."""
    graph = edges()
    assert "evaluations.store" in graph["actors.broker"]
    assert "actors.broker" in graph["app.submission"]
    assert cycles({**graph, "evaluations.store": {*graph["evaluations.store"], "app.submission"}})


def test_importing_the_api_the_shim_or_the_cli_builds_no_broker_and_sets_no_global() -> None:
    """Building the broker, its middleware and Dramatiq's globals happens in entry points
    (actors.worker.build_worker), never because a module was imported."""
    probe = (
        "import dramatiq, dramatiq.broker, dramatiq.encoder\n"
        "import app.api.routes, app.cli, executor.app, tasks, retry_config\n"
        "assert dramatiq.broker.global_broker is None, dramatiq.broker.global_broker\n"
        "assert type(dramatiq.get_encoder()) is dramatiq.JSONEncoder, dramatiq.get_encoder()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
