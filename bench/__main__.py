"""`python -m bench <scenario> [options]`: one benchmark scenario; `--help` after a scenario
name shows its options. Each prints a table and can write JSON (`--json file`)."""

from __future__ import annotations

import importlib
import sys

SCENARIOS = {
    "queue": "bench.queue_overhead",
    "evaluations": "bench.evaluations",
    "api": "bench.api",
    "priority": "bench.priority",
    "cases": "bench.cases",
    "scaling": "bench.scaling",
    "store": "bench.store_cost",
    "redis-ops": "bench.redis_ops",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        print(__doc__, "\nscenarios:", ", ".join(SCENARIOS), file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(SCENARIOS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
