"""The metrics options and building RenewalMetrics from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from singlewriter.metrics import RenewalMetrics

from ._options import Options, ip_address, port

__all__ = ["add_metrics_options", "open_metrics"]


def add_metrics_options(options: Options) -> None:
    """Add --metrics-port, --metrics-address and --metrics-textfile."""
    options.add(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus metrics on this port at /metrics",
        show_default="not served",
    )
    options.add(
        "--metrics-address",
        type=ip_address,
        default="127.0.0.1",
        metavar="ADDRESS",
        help="IP address the metrics port binds; 0.0.0.0 exposes it to the network",
    )
    options.add(
        "--metrics-textfile",
        type=Path,
        metavar="FILE",
        help="write metrics atomically to FILE (name it *.prom) for"
        " node_exporter's textfile collector",
        show_default="not written",
    )


def open_metrics(args: argparse.Namespace) -> RenewalMetrics | None:
    """Return metrics as the options ask, or None when none are asked for.

    Raise ConfigError when prometheus-client is missing or the port cannot
    be bound.
    """
    if args.metrics_port is None and args.metrics_textfile is None:
        return None
    metrics = RenewalMetrics(textfile=args.metrics_textfile)
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, args.metrics_address)
    return metrics
