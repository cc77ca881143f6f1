"""Guards against reward hacking through the real loop: a gold reward, DPOK's adaptive beta, early stop."""

import json

import pytest

from orchestrator.metrics import read_metrics
from orchestrator.run import train
from orchestrator.rundir import RunDir, lora_choice
from tests.helpers.runs import tiny_config

# DPOK whose beta halves after every epoch (a target far above any KL this run reaches), on two
# learners: rank 0 decides to stop, and the other rank must stop with it.
ADAPTIVE = {
    "train.algorithm": "dpok",
    "train.beta": 0.5,
    "train.kl_target": 1.0e6,
    "train.eval_every": 2,
    "train.checkpoint_every": 2,
    "learner.num_workers": 2,
    "learner.gradient_accumulation_steps": 1,
}
# The gold reward is the training reward's opposite (jpeg_incompressibility): training pushes it down,
# and within a few evals it falls below its best by more than a hair: the run stops there.
GUARDED = {
    **ADAPTIVE,
    "train.epochs": 8,
    "train.keep_checkpoints": 1,
    "train.gold_reward": "jpeg_compressibility",
    "train.early_stop": "{gold_drop: 1.0e-6}",
}


def test_gold_is_watched_not_trained_on_beta_adapts_and_resumes_and_early_stop_keeps_the_best(
    ray_cluster, tiny_pipeline_dir, tmp_path, capsys
):
    guarded, plain = tmp_path / "guarded", tmp_path / "plain"
    train(tiny_config(tiny_pipeline_dir, **GUARDED), guarded, progress=False)
    end = capsys.readouterr().out.strip().splitlines()[-1]
    rows = read_metrics(guarded)
    stopped = rows[-1]["epoch"]
    assert stopped < 8 and stopped % 2 == 0  # gold is measured, and the rule checked, at the eval epochs only

    # Gold at the eval epochs only, with the reward's own diagnostics, and an early stop at the first fall.
    for m in rows:
        assert ("gold/mean" in m) == (m["epoch"] % 2 == 0), m["epoch"]
    golds = {m["epoch"]: m["gold/mean"] for m in rows if "gold/mean" in m}
    assert all(rows[e - 1]["gold/jpeg_compressibility/score"] == pytest.approx(g) for e, g in golds.items())
    assert all(rows[e - 1]["gold/std"] >= 0 for e in golds)
    evals = sorted(golds)
    best = max(evals[:-1], key=golds.get)  # the earliest of equals
    # The rule fired at the first eval epoch whose gold fell more than gold_drop below the best before it.
    assert [e for i, e in enumerate(evals) if i and max(golds[b] for b in evals[:i]) - golds[e] > 1e-6][:1] == [stopped]
    assert end == (
        f"early stop after epoch {stopped} of 8: gold/mean {golds[stopped]:.4g} fell {golds[best] - golds[stopped]:.4g} below its best, "
        f"{golds[best]:.4g} at epoch {best}, more than early_stop.gold_drop = 1e-06; best checkpoint "
        f"{RunDir(guarded).checkpoints.uri}/epoch_{best:04d} (epoch {best}, gold/mean {golds[best]:.4g}; checkpoints/best names it)"
    )
    # checkpoints/best outlives keep_checkpoints = 1, and --lora RUN takes it.
    run = RunDir(guarded)
    assert run.best_checkpoint() == run.checkpoint(best) and run.latest_checkpoint() == run.checkpoint(stopped)
    assert lora_choice(guarded)[0] == run.checkpoint(best).lora
    # --resume of the stopped run, even with more epochs, trains nothing and changes nothing: it says how the run ended.
    before = (guarded / "metrics.jsonl").read_text(), (guarded / "config.yaml").read_text()
    train(tiny_config(tiny_pipeline_dir, **{**GUARDED, "train.epochs": 12}), guarded, resume=True, progress=False)
    assert capsys.readouterr().out.strip() == f"--resume: nothing to train; the run ended with an {end}"
    assert ((guarded / "metrics.jsonl").read_text(), (guarded / "config.yaml").read_text()) == before

    # beta halves every epoch (KL far below its target), and the learners train with the beta they are sent:
    # DPOK's KL loss is beta times the KL.
    assert [m["kl/beta"] for m in rows] == pytest.approx([max(0.5 / 2**i, 0.5 / 100) for i in range(stopped)])  # floor: 100x below
    for m in rows[1:]:
        assert m["kl/mean"] > 0 and m["loss/kl"] == pytest.approx(m["kl/beta"] * m["kl/mean"], rel=1e-4)

    # The same run without the gold reward, in two parts: 2 epochs, then resumed to `stopped`.
    train(tiny_config(tiny_pipeline_dir, **{**ADAPTIVE, "train.epochs": 2}), plain, progress=False)
    state = json.loads((plain / "checkpoints" / "epoch_0002" / "state.json").read_text())
    assert state["guards"]["beta"] == pytest.approx(0.5 / 4)  # the beta of the next update, saved with the checkpoint
    train(tiny_config(tiny_pipeline_dir, **{**ADAPTIVE, "train.epochs": stopped}), plain, resume=True, progress=False)
    resumed = read_metrics(plain)
    # The resumed run goes on with the beta it had, and gold never reached the advantages: every epoch's training
    # reward equals the guarded run's.
    assert [m["kl/beta"] for m in resumed] == pytest.approx([m["kl/beta"] for m in rows])
    assert [m["reward/mean"] for m in resumed] == pytest.approx([m["reward/mean"] for m in rows], rel=1e-4)
    assert not any(key.startswith("gold/") for m in resumed for key in m)
