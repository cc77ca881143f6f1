"""The fault matrix's table, its broken reward and its command line (its runs are real: see docs/failures.md)."""

import numpy as np

from jobs.bench.faults import faults, format_table, nan_for_a_quarter
from jobs.cli import build_parser, main


def test_the_broken_reward_breaks_on_the_same_prompts_alone_or_in_a_batch():
    prompts = [f"prompt {i}" for i in range(40)]
    images = np.full((40, 4, 4, 3), 51, dtype=np.uint8)
    scores, _ = nan_for_a_quarter(images, prompts, [{}] * 40)
    broken = np.isnan(scores)
    assert 0 < broken.sum() < 40 and np.allclose(scores[~broken], 0.2)
    alone = [nan_for_a_quarter(images[i : i + 1], prompts[i : i + 1], [{}])[0][0] for i in range(40)]
    assert np.array_equal(np.isnan(alone), broken)  # reward.on_invalid: drop re-scores images one by one


def test_every_fault_has_a_name_and_one_way_in():
    names = [f.name for f in faults()]
    assert len(set(names)) == len(names) >= 12
    assert all(f.driver or f.inject is not None or f.overrides for f in faults())


def test_the_table_says_which_faults_were_not_recovered():
    report = {
        "rows": [
            {
                "fault": "learner killed",
                "when": "after checkpoint 1",
                "recovered": True,
                "recovery_s": 12.34,
                "samples_lost": 0,
                "samples_duplicated": 0,
                "weights_equal": True,
            },
            {"fault": "reward returns NaN (on_invalid: error)", "when": "every epoch", "recovered": False, "note": "the run did not stop"},
        ]
    }
    lines = format_table(report).splitlines()
    assert [cell.strip() for cell in lines[1].split("|")][:7] == ["learner killed", "after checkpoint 1", "yes", "12.3", "0", "0", "yes"]
    assert "NO" in lines[2] and "the run did not stop" in lines[2]


def test_the_command_needs_a_preset_and_defaults_to_three_epochs(capsys):
    args = build_parser().parse_args(["bench", "faults", "--preset", "toy-bench"])
    assert args.epochs == 3 and args.only == [] and args.module == "jobs.bench.faults"
    # A 3-node cluster of 4 logical CPUs each, in sync mode, the judge down for 30 s.
    assert (args.nodes, args.cpus_per_node, args.asynchronous, args.judge_down_s) == (3, 4, False, 30.0)
    assert main(["bench", "faults"]) == 2
    assert "give --preset NAME" in capsys.readouterr().err
    assert main(["bench", "faults", "--preset", "toy-bench", "--nodes", "2", "--only", "node"]) == 2
    assert "--nodes must be >= 3 for the node fault" in capsys.readouterr().err
