"""``rayalign train``: run (or resume) distributed training and say how to evaluate the result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.config import load_config, load_preset
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir
from orchestrator.trackers import DEFAULT_TRACKERS


def run(args: argparse.Namespace) -> int:
    if args.preset:
        cfg = load_preset(args.preset, args.overrides)
    elif args.config:
        cfg = load_config(args.config, args.overrides)
    elif args.overrides:
        raise ValueError("--set needs --preset or --config (on --resume, give the run's own --config to change train.epochs)")
    elif not args.resume:
        raise ValueError("give --preset NAME or --config FILE (or --resume to continue a run)")
    else:
        cfg = None
    output = train(
        cfg,
        args.output_dir,
        resume=args.resume,
        address=args.address,
        num_cpus=args.num_cpus,
        progress=not args.no_progress and sys.stderr.isatty(),
        dashboard=args.dashboard,
        loggers=args.loggers or DEFAULT_TRACKERS,
    )
    metrics = read_metrics(output)
    if metrics:
        last = metrics[-3:]
        last_mean = sum(m["reward/mean"] for m in last) / len(last)
        print(f"reward/mean: epoch 1 {metrics[0]['reward/mean']:.4f} -> last {len(last)} epochs {last_mean:.4f}")
    print(f"run written to {output}; evaluate with: {eval_command(output)}")
    return 0


def eval_command(output: Path) -> str:
    """The `rayalign eval` line that scores a run's LoRA on held-out prompts (it samples as the run did by itself)."""
    cfg = RunDir(output).read_config()
    model = f" --model {cfg.model.path}" if cfg.model.path else ""
    reward = " ".join(f"--reward {c.name}={c.weight:g}" if c.weight != 1 else f"--reward {c.name}" for c in cfg.reward.components)
    return f"rayalign eval{model} --lora {output} --prompts {cfg.train.eval_prompts} {reward} --output {output}/eval_heldout.json"
