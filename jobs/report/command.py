"""``rayalign report RUN``: write one self-contained HTML page of a run's curves, image grids and config."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from actors.storage import Location, is_uri
from jobs.report.page import build_report
from jobs.report.runs import load_runs

logger = logging.getLogger("rayalign")

DEFAULT_NAME = "report.html"


def output_for(args: argparse.Namespace) -> Location:
    """Where the report goes: ``--output``, else ``report.html`` in the (first) local run or sweep directory."""
    if args.output:
        output = Location(args.output)
    elif is_uri(args.run):
        raise ValueError(f"{args.run} is in object storage: say where the report goes with --output FILE.html (a path or a URI)")
    else:
        output = Location(args.run) / DEFAULT_NAME
    if not output.name.lower().endswith((".html", ".htm")):
        raise ValueError(f"--output {args.output!r} must end in .html (the report is one HTML file)")
    return output


def run(args: argparse.Namespace) -> int:
    if args.max_grids < 1:
        raise ValueError(f"--max-grids must be >= 1, got {args.max_grids}")
    output = output_for(args)
    started = time.perf_counter()
    paths = [args.run, *args.compare]
    logger.info("reading %s", ", ".join(map(str, paths)))
    runs = load_runs(paths)
    epochs = sum(len(r.rows) for r in runs)
    logger.info("plotting %d run%s, %d epochs in all", len(runs), "s" if len(runs) > 1 else "", epochs)
    page = build_report(runs, max_grids=args.max_grids, progress=not args.no_progress and sys.stderr.isatty())
    output.write_text(page)
    size = len(page.encode("utf-8"))
    print(f"wrote {output} ({size / 1e6:.1f} MB, {len(runs)} run{'s' if len(runs) > 1 else ''}) in {time.perf_counter() - started:.1f}s")
    return 0
