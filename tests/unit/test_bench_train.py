"""The training benchmark's arithmetic, by hand, and its command line (no Ray)."""

import pytest

from jobs.bench_train import bench_config, compare_rewards, summarize_run
from jobs.cli import build_parser
from orchestrator.config import load_preset


def epoch(n, *, wall, rollout, learn, critical, rss, store, reward=0.0):
    return {
        "epoch": n, "samples": 10 * n, "time/epoch_s": wall, "time/critical_path_s": critical, "time/sync_s": 0.01, "sync/load_s": 0.02,
        "sync/bytes": 1000, "busy/rollout_s": rollout, "busy/learner_s": learn, "idle/rollout_frac": 1 - rollout / wall,
        "idle/learner_frac": 1 - learn / wall, "memory/controller_rss_bytes": rss, "memory/controller_refs": 5,
        "memory/object_store_bytes": store, "memory/object_store_peak_bytes": store + 50, "reward/mean": reward,
        "replay/staleness_mean": 1.0, "is/ess_frac": 0.9,
    }


def test_summary_by_hand():
    metrics = [epoch(1, wall=9.0, rollout=5, learn=3, critical=8, rss=100, store=10),  # warm-up: not timed
               epoch(2, wall=4.0, rollout=2, learn=1, critical=3.6, rss=110, store=10),
               epoch(3, wall=6.0, rollout=3, learn=3, critical=5.4, rss=121, store=10)]
    s = summarize_run(metrics)
    # 20 samples over 10 s after the warm-up; critical path 9 s of 10 s -> overhead 0.1
    assert s["samples_per_s"] == pytest.approx(2.0)
    assert s["overhead_frac"] == pytest.approx(0.1)
    assert s["busy_s"] == {"rollout": 5, "learner": 4}
    # idle = 1 - busy / wall over the timed epochs: rollout 1 - 5/10, learner 1 - 4/10
    assert s["idle_frac"]["rollout"] == pytest.approx(0.5) and s["idle_frac"]["learner"] == pytest.approx(0.6)
    # RSS growth after the warm-up: 121 vs 110
    assert s["controller_rss_growth_frac"] == pytest.approx(0.1)
    assert s["object_store_back_to_baseline"] and s["object_store_epochs_above_baseline"] == 0


def test_a_store_that_keeps_growing_is_flagged():
    metrics = [epoch(n, wall=1, rollout=1, learn=1, critical=1, rss=1, store=10 + 100 * n) for n in (1, 2, 3, 4)]
    assert not summarize_run(metrics)["object_store_back_to_baseline"]


def test_reward_comparison_by_hand():
    sync = [0.0, 0.0, 1.0, 3.0]
    # second halves: sync [1, 3] mean 2 var 2; async [1, 1] mean 1 var 0 -> se = sqrt(2/2) = 1
    worse_within_noise = compare_rewards(sync, [0.0, 0.0, 1.0, 1.0])
    assert worse_within_noise["async_minus_sync"] == pytest.approx(-1.0) and worse_within_noise["standard_error"] == pytest.approx(1.0)
    assert worse_within_noise["async_not_worse"]
    assert not compare_rewards([0, 0, 5.0, 5.1], [0, 0, 1.0, 1.1])["async_not_worse"]
    with pytest.raises(ValueError, match="same length >= 4"):
        compare_rewards([1, 2, 3], [1, 2, 3])


def test_bench_config_changes_only_mode_epochs_eval_and_checkpoints():
    cfg = load_preset("toy-bench")
    run = bench_config(cfg, mode="async", epochs=7)
    assert (run.train.mode, run.train.epochs, run.train.eval_every, run.train.checkpoint_every) == ("async", 7, 0, 7)
    assert run.pools == cfg.pools and run.learner == cfg.learner and run.sampling == cfg.sampling


def test_bench_preset_gives_every_pool_its_own_cpu():
    cfg = load_preset("toy-bench")
    assert cfg.pools.rollout.num_cpus == cfg.pools.reward.num_cpus == cfg.learner.num_cpus_per_worker == 1
    assert cfg.pools.reference.num_actors == 0 and cfg.train.mode == "sync"


def test_bench_without_a_kind_is_the_training_bench_and_serve_stays():
    from jobs.cli import run_bench_serve, run_bench_train

    args = build_parser().parse_args(["bench", "--preset", "toy-bench", "--epochs", "6", "--output", "b.json"])
    assert args.run is run_bench_train and (args.preset, args.epochs, args.output) == ("toy-bench", 6, "b.json")
    args = build_parser().parse_args(["bench", "serve", "--requests", "5"])
    assert args.run is run_bench_serve and args.requests == 5


def test_bench_without_preset_or_config_says_what_to_give():
    args = build_parser().parse_args(["bench"])
    with pytest.raises(ValueError, match="give --preset NAME"):
        args.run(args)
