"""Guards against reward hacking without Ray: the adaptive beta, the early-stop rule, their config, checkpoints/best."""

import json
import math
import re

import numpy as np
import pytest

from actors.rl.kl_control import adaptive_beta
from actors.toy import world as toy_world
from orchestrator import rundir
from orchestrator.config import load_config
from orchestrator.guards import GuardState, after_epoch, end_line
from orchestrator.rundir import RunDir, lora_choice, resolve_model


@pytest.mark.parametrize(
    "beta, kl, target, expected",
    [
        # PPO's rule with target 0.01: the band is (0.01 / 1.5, 0.01 * 1.5) = (0.00667, 0.015).
        (0.1, 0.02, 0.01, 0.2),  # 0.02 > 0.015: the policy drifts, beta doubles
        (0.1, 0.003, 0.01, 0.05),  # 0.003 < 0.00667: the anchor is too strong, beta halves
        (0.1, 0.012, 0.01, 0.1),  # inside the band: unchanged
        (0.1, 0.015, 0.01, 0.1),  # on the upper edge: not above it, unchanged
        (0.1, 0.0, 0.01, 0.05),  # no drift at all: halves
        (0.1, math.nan, 0.01, 0.1),  # not measured: unchanged
        (0.0, 1.0, 0.01, 0.0),  # 0 * 2 = 0 (the config refuses beta 0 with a target)
    ],
)
def test_adaptive_beta_follows_ppos_rule(beta, kl, target, expected):
    assert adaptive_beta(beta, kl=kl, target=target) == pytest.approx(expected)


def test_adaptive_beta_stays_within_its_bounds():
    # Halving from 0.1 stops at the floor, doubling at the ceiling; inside them the rule is unchanged.
    assert adaptive_beta(0.1, kl=0.0, target=0.01, low=0.08, high=0.3) == 0.08
    assert adaptive_beta(0.2, kl=1.0, target=0.01, low=0.08, high=0.3) == 0.3
    assert adaptive_beta(0.2, kl=0.0, target=0.01, low=0.08, high=0.3) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="0 <= low <= high"):
        adaptive_beta(0.1, kl=0.1, target=0.1, low=1.0, high=0.5)


def test_adaptive_beta_refuses_nonsense():
    with pytest.raises(ValueError, match="target must be a finite KL > 0"):
        adaptive_beta(0.1, kl=0.1, target=0.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        adaptive_beta(-1.0, kl=0.1, target=0.1)


def _train(**fields):
    base = {"algorithm": "dpok", "eval_every": 2, "checkpoint_every": 2}
    return load_config({"train": {**base, **fields}}).train


def test_the_best_gold_epoch_is_kept_and_a_drop_beyond_gold_drop_stops_the_run():
    train = _train(gold_reward="toy_fidelity", early_stop={"gold_drop": 0.05}, beta=0.1, kl_target=0.01)
    state = GuardState.start(train)
    # (epoch, kl/mean, gold/mean or None off eval epochs, checkpointed)
    epochs = [(1, 0.02, None, False), (2, 0.02, 0.50, True), (3, 0.001, None, False), (4, 0.012, 0.60, True), (6, 0.0, 0.56, True)]
    seen = []
    for epoch, kl, gold, checkpointed in epochs:
        state = after_epoch(state, train, epoch=epoch, kl=kl, gold=gold, checkpointed=checkpointed)
        seen.append((state.beta, state.best_epoch, state.stopped_epoch))
    # beta: 0.1 -> x2 -> x2 -> /2 -> unchanged -> /2; best: epoch 2 (0.50), then 4 (0.60);
    # 0.56 is 0.04 below 0.60, within gold_drop: the run goes on, epoch 4 stays the best.
    assert seen == [(0.2, None, None), (0.4, 2, None), (0.2, 2, None), (0.2, 4, None), (0.1, 4, None)]
    state = after_epoch(state, train, epoch=8, kl=0.01, gold=0.54, checkpointed=True)  # 0.06 below: stop
    assert (state.stopped_epoch, state.best_epoch, state.best_gold) == (8, 4, 0.60)
    assert state.reason == "gold/mean 0.54 fell 0.06 below its best, 0.6 at epoch 4, more than early_stop.gold_drop = 0.05"
    assert GuardState.from_dict(json.loads(json.dumps(state.to_dict()))) == state  # what state.json holds
    line = end_line(state, epochs=20, checkpoints="runs/x/checkpoints")
    assert line.startswith("early stop after epoch 8 of 20: gold/mean 0.54 fell")
    assert "best checkpoint runs/x/checkpoints/epoch_0004 (epoch 4, gold/mean 0.6; checkpoints/best names it)" in line


def test_the_kl_bound_stops_the_run_and_without_gold_the_newest_checkpoint_within_it_is_best():
    train = _train(early_stop={"max_kl": 0.1}, checkpoint_every=1)
    state = GuardState.start(train)
    state = after_epoch(state, train, epoch=1, kl=0.05, gold=None, checkpointed=True)
    state = after_epoch(state, train, epoch=2, kl=0.09, gold=None, checkpointed=True)
    assert state.best_epoch == 2 and state.stopped_epoch is None and state.beta == train.beta  # no kl_target: beta stays
    state = after_epoch(state, train, epoch=3, kl=0.2, gold=None, checkpointed=True)
    assert (state.stopped_epoch, state.best_epoch, state.reason) == (3, 2, "kl/mean 0.2 is above early_stop.max_kl = 0.1")
    # A KL bound broken before any checkpoint: nothing is best, and the line says so.
    early = after_epoch(GuardState.start(train), train, epoch=1, kl=0.5, gold=None, checkpointed=True)
    assert early.best_epoch is None and "no checkpoint was kept as the best" in end_line(early, epochs=5, checkpoints="c")
    # An epoch without a checkpoint is never the best, whatever its gold.
    gold_train = _train(gold_reward="toy_fidelity", early_stop={"gold_drop": 0.1})
    assert after_epoch(GuardState.start(gold_train), gold_train, epoch=1, kl=0.0, gold=0.9, checkpointed=False).best_epoch is None


def test_without_early_stop_only_beta_moves():
    train = _train(gold_reward="toy_fidelity", kl_target=1.0)
    state = after_epoch(GuardState.start(train), train, epoch=2, kl=0.0, gold=0.1, checkpointed=True)
    assert state == GuardState(beta=train.beta / 2)
    assert end_line(GuardState(beta=1.0, best_epoch=10, best_gold=0.7), epochs=10, checkpoints="c").startswith(
        "no early stop in 10 epochs; best checkpoint c/epoch_0010"
    )


@pytest.mark.parametrize(
    "train, message",
    [
        ({"kl_target": 0.01}, "train.kl_target adapts DPOK's beta, but algorithm is 'ddpo_is': set train.algorithm: dpok"),
        ({"kl_target": 0.0, "algorithm": "dpok"}, "train.kl_target must be > 0, got 0"),
        ({"kl_target": 0.01, "algorithm": "dpok", "beta": 0}, "train.beta must be > 0 with kl_target"),
        ({"gold_reward": "toy_fidelity", "eval_every": 0}, "train.gold_reward is scored at the eval epochs, but eval_every is 0"),
        (
            {"gold_reward": "toy_fidelity", "eval_every": 5, "checkpoint_every": 2, "early_stop": {"gold_drop": 0.05}},
            "train.checkpoint_every must divide eval_every (5)",
        ),
        ({"early_stop": {"gold_drop": 0.05}}, "train.early_stop.gold_drop needs a gold reward to watch: set train.gold_reward"),
        ({"early_stop": {}}, "train.early_stop: set gold_drop, max_kl or both"),
        ({"early_stop": {"max_kl": -1}}, "train.early_stop.max_kl must be > 0, got -1"),
        ({"early_stop": {"max_kl": 0.1}, "algorithm": "ddpo_is"}, "train.early_stop.max_kl needs a measured KL"),
    ],
)
def test_guard_settings_are_checked_at_load_with_the_field_and_the_fix(train, message):
    pools = {"reference": {"num_actors": 0}}  # so that ddpo_is measures no KL
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config({"train": train, "pools": pools})


def test_the_reward_worker_scores_the_gold_reward_only_when_asked():
    from actors.workers.reward import RewardWorker
    from orchestrator.config import RewardConfig

    prompts = toy_world.train_prompts()[:4]
    images = toy_world.render_batch(prompts, range(4))  # ground-truth renders: toy_fidelity 1.0
    worker = RewardWorker(
        RewardConfig(components=({"name": "jpeg_compressibility"},)), gold=RewardConfig(components=({"name": "toy_fidelity"},))
    )
    trained, trained_info, _ = worker.score(images, prompts, 0)
    gold, gold_info, _ = worker.score(images, prompts, 0, gold=True)
    assert np.all(trained < 0) and np.all(gold == 1.0)  # -kB of JPEG, and every attribute right
    assert set(gold_info) == {"toy_fidelity/score", "toy_fidelity/color_acc", "toy_fidelity/shape_acc", "toy_fidelity/position_acc"}
    assert "jpeg_compressibility/score" in trained_info
    with pytest.raises(ValueError, match="no gold reward: train.gold_reward is not set"):
        RewardWorker(RewardConfig()).score(images, prompts, 0, gold=True)


def _checkpoint_with_adapter(run: RunDir, epoch: int, *, keep: int, best: bool = False):
    checkpoint = rundir.begin_checkpoint(run, epoch)
    (checkpoint.lora / "adapter_config.json").write_text("{}")  # what locate_lora looks for; nothing is loaded here
    rundir.commit_checkpoint(run, checkpoint, keep=keep, best=best)
    return checkpoint


def test_the_best_checkpoint_outlives_pruning_and_a_run_stands_for_it(tmp_path):
    run = RunDir(tmp_path / "run")
    _checkpoint_with_adapter(run, 1, keep=2)
    assert lora_choice(run.root.uri) == (run.checkpoint(1).lora, f"{run.checkpoint(1).location} (the run's latest checkpoint)")
    _checkpoint_with_adapter(run, 2, keep=2, best=True)
    for epoch in (3, 4, 5):
        _checkpoint_with_adapter(run, epoch, keep=2)
    # keep=2 prunes the old ones, but never the best.
    assert [c.name for c in run.complete_checkpoints()] == ["epoch_0002", "epoch_0004", "epoch_0005"]
    assert run.best_checkpoint() == run.checkpoint(2) and run.latest_checkpoint() == run.checkpoint(5)
    # --lora RUN takes the best; RUN/checkpoints/latest and .../best name either one explicitly.
    assert lora_choice(run.root.uri) == (run.checkpoint(2).lora, f"{run.checkpoint(2).location} (the run's best checkpoint)")
    assert lora_choice(run.checkpoints / "latest")[0] == run.checkpoint(5).lora
    assert lora_choice(str(run.checkpoints / "best")) == (run.checkpoint(2).lora, f"{run.checkpoint(2).location} (best)")
    # A new best moves the pointer, and the old best is pruned like any other.
    _checkpoint_with_adapter(run, 6, keep=2, best=True)
    assert [c.name for c in run.complete_checkpoints()] == ["epoch_0005", "epoch_0006"]
    # A best that is not complete (its rewrite was killed) is not taken: the latest is.
    rundir.begin_checkpoint(run, 6)
    assert run.best_checkpoint() is None and lora_choice(run.root.uri)[0] == run.checkpoint(5).lora
    with pytest.raises(ValueError, match="names 'epoch_0006', which is not a complete checkpoint"):
        lora_choice(run.checkpoints / "best")


def test_a_fully_fine_tuned_run_stands_for_its_best_checkpoint_too(tmp_path):
    run = RunDir(tmp_path / "run")
    for epoch, best in ((1, True), (2, False)):
        checkpoint = rundir.begin_checkpoint(run, epoch)
        (checkpoint.unet / "config.json").write_text("{}")
        checkpoint.config.write_text("model: {finetune: full}\n")
        rundir.commit_checkpoint(run, checkpoint, keep=2, best=best)
    assert resolve_model(run.root.uri)[1] == run.checkpoint(1).unet
    assert resolve_model(run.checkpoints / "latest")[1] == run.checkpoint(2).unet
