"""The training benchmark's arithmetic, by hand, and its command line (no Ray)."""

import pytest

from jobs.bench.scaling import format_table, summarize_size
from jobs.bench.training import bench_config, compare_rewards, summarize_run
from jobs.cli import build_parser
from orchestrator.config import load_preset


def epoch(n, *, wall, rollout, learn, critical, rss, store, reward=0.0):
    return {
        "epoch": n,
        "samples": 10 * n,
        "time/epoch_s": wall,
        "time/critical_path_s": critical,
        "time/sync_s": 0.01,
        "sync/load_s": 0.02,
        "sync/bytes": 1000,
        "busy/rollout_s": rollout,
        "busy/learner_s": learn,
        "idle/rollout_frac": 1 - rollout / wall,
        "idle/learner_frac": 1 - learn / wall,
        "memory/controller_rss_bytes": rss,
        "memory/controller_refs": 5,
        "memory/object_store_bytes": store,
        "memory/object_store_peak_bytes": store + 50,
        "reward/mean": reward,
        "replay/staleness_mean": 1.0,
        "is/ess_frac": 0.9,
    }


def test_summary_by_hand():
    metrics = [
        epoch(1, wall=9.0, rollout=5, learn=3, critical=8, rss=100, store=10),  # warm-up: not timed
        epoch(2, wall=4.0, rollout=2, learn=1, critical=3.6, rss=110, store=10),
        epoch(3, wall=6.0, rollout=3, learn=3, critical=5.4, rss=121, store=10),
    ]
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


def test_startup_comes_from_the_first_epoch():
    metrics = [epoch(n, wall=2.0, rollout=1, learn=1, critical=2, rss=1, store=1) for n in (1, 2)]
    metrics[0].update({"time/startup_s": 9.0, "time/startup/connect_s": 2.0, "time/startup/learner_group_s": 6.0})
    s = summarize_run(metrics)
    assert s["startup_s"] == 9.0 and s["startup_phases_s"] == {"connect": 2.0, "learner_group": 6.0}


def test_scaling_summary_by_hand():
    def size_epoch(n, wall, busy):
        return {
            "epoch": n,
            "samples": 16 * n,
            "time/epoch_s": wall,
            "time/rollout_s": wall / 2,
            "reward/mean": 0.5,
            "time/startup_s": 7.5,
            **{f"busy/rollout/{a}_s": b for a, b in enumerate(busy)},
            **{f"idle/rollout/{a}_frac": 1 - b / wall for a, b in enumerate(busy)},
        }

    two = summarize_size([size_epoch(1, 10.0, [9, 9]), size_epoch(2, 4.0, [3, 2]), size_epoch(3, 4.0, [3, 2])], actors=2)
    # 32 samples in 8 s after the warm-up; actor 1 idle 1 - 4/8
    assert two["samples_per_s"] == pytest.approx(4.0) and two["actor_idle_frac"] == pytest.approx([0.25, 0.5])
    assert two["actor_busy_s"] == [6, 4] and two["startup_s"] == 7.5
    two["speedup"] = 1.6
    row = format_table({"runs": [two]}).splitlines()[1]
    assert [cell.strip() for cell in row.split("|")] == ["2", "4.00", "1.60x", "2.00", "7.5", "0.25 0.50"]


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
    args = build_parser().parse_args(["bench", "--preset", "toy-bench", "--epochs", "6", "--output", "b.json"])
    assert args.module == "jobs.bench.training" and (args.preset, args.epochs, args.output) == ("toy-bench", 6, "b.json")
    args = build_parser().parse_args(["bench", "serve", "--requests", "5"])
    assert args.module == "jobs.bench.serving" and args.requests == 5


def test_bench_without_preset_or_config_says_what_to_give():
    from jobs.bench.training import run

    with pytest.raises(ValueError, match="give --preset NAME"):
        run(build_parser().parse_args(["bench"]))
