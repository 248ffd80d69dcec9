"""The cost of tracing: CPU per 1,000 checks and RSS of a probe process with OTLP export
on (to a local receiver that decodes everything) versus off, in the same run."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.core import Row, delay_server, process_cost


def run() -> list[Row]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from otlp_receiver import OtlpReceiver  # the test suite's receiver: real gRPC + protobuf decoding

    rows: list[Row] = []
    with delay_server(0) as url, OtlpReceiver() as rx:
        off_cpu, off_rss, _ = process_cost(url)
        on_env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        }
        on_cpu, on_rss, _ = process_cost(url, extra_env=on_env)
        spans = len(rx.spans())
    rows.append(("tracing: CPU s per 1,000 checks, OTLP off / on", f"{off_cpu:.3f} / {on_cpu:.3f}"
                 f"  (x{on_cpu / off_cpu:.2f})"))
    rows.append(("tracing: RSS MB, OTLP off / on", f"{off_rss:.1f} / {on_rss:.1f}  (x{on_rss / off_rss:.2f})"))
    rows.append(("tracing: spans received during the run", str(spans)))
    return rows


if __name__ == "__main__":
    for label, value in run():
        print(f"{label}: {value}")
