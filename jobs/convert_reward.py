"""``rayalign convert-reward``: turn a published reward checkpoint (a pickle) into safetensors, once."""

from __future__ import annotations

import argparse

from actors.rewards.convert import convert_reward
from jobs.console import quiet_library_progress


def run(args: argparse.Namespace) -> int:
    for flag in ("vision_heads", "text_heads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    quiet_library_progress()
    output = convert_reward(
        args.kind,
        source=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
    )
    print(f"wrote {output}; use it as the `weights` option of the {args.kind if args.kind != 'clip' else 'clip_score or pickscore'} reward")
    return 0
