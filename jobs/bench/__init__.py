"""``rayalign bench``: training (sync vs async), rollout-pool scaling, the fault matrix, serving.

What the training benchmarks share: the config they run (a preset or a file, with ``--set``),
where their runs go and the JSON report they may write.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config import Config, load_config, load_preset


def json_output(path: str | None) -> Path | None:
    """``--output`` as a path, checked before any work starts (None when not given)."""
    if path is not None and Path(path).suffix.lower() != ".json":
        raise ValueError(f"--output {path!r} must end in .json")
    return Path(path) if path else None


def config_of(args: argparse.Namespace, *, what: str) -> Config:
    """The config named by ``--preset`` or ``--config``, with ``--set`` applied; ``what`` says what it is for in the error."""
    if not (args.preset or args.config):
        raise ValueError(f"give --preset NAME (e.g. toy-bench) or --config FILE to {what}")
    return load_preset(args.preset, args.overrides) if args.preset else load_config(args.config, args.overrides)


def workdir_of(args: argparse.Namespace, *, prefix: str) -> Path:
    """``--workdir``, or a new temporary directory."""
    return Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=prefix))


def write_report(output: Path | None, report: dict[str, Any]) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {output}")
