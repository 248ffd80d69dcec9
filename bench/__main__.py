"""`python -m bench`: run every benchmark and print one table."""

from __future__ import annotations

import importlib
import sys

# Each module has run() -> list[(label, value)]; missing optional ones are reported, not fatal.
MODULES = (
    "bench.core",
    "bench.bench_accuracy",
    "bench.bench_discovery",
    "bench.bench_tracing",
    "bench.bench_cardinality",
    "bench.bench_hostile",
    "bench.bench_blackbox",
    "bench.bench_kinds",
    "bench.bench_mesh",
    "bench.bench_udp",
)


def main() -> int:
    rows: list[tuple[str, str]] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(module.run())
    width = max(len(label) for label, _ in rows)
    print(f"| {'figure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for label, value in rows:
        print(f"| {label.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
