"""Which denoising steps the learner trains on (DDPO's timestep_fraction and its selection)."""

import numpy as np
import pytest

from actors.workers.learner import step_orders
from orchestrator.config import Config, from_dict


def test_random_selection_draws_a_fresh_subset_of_all_steps_per_trajectory():
    order = step_orders(np.random.default_rng(0), batch=64, num_steps=10, train_timesteps=4, selection="random")
    assert order.shape == (64, 4)
    assert all(len(set(row)) == 4 for row in order)  # no step twice in a trajectory
    assert set(order.ravel()) == set(range(10))  # late steps are trained too
    assert len({tuple(sorted(row)) for row in order}) > 10  # subsets differ between trajectories


def test_earliest_selection_trains_only_the_first_steps_in_shuffled_order():
    order = step_orders(np.random.default_rng(0), batch=64, num_steps=10, train_timesteps=6, selection="earliest")
    assert order.shape == (64, 6)
    assert all(sorted(row) == list(range(6)) for row in order)
    assert len({tuple(row) for row in order}) > 1  # the order within the window is shuffled


def test_step_orders_reject_bad_arguments():
    with pytest.raises(ValueError, match="'random' or 'earliest', got 'last'"):
        step_orders(np.random.default_rng(0), batch=2, num_steps=10, train_timesteps=2, selection="last")
    with pytest.raises(ValueError, match=r"train_timesteps must be in \[1, num_steps=10\], got 11"):
        step_orders(np.random.default_rng(0), batch=2, num_steps=10, train_timesteps=11, selection="earliest")


def test_config_rejects_an_unknown_timestep_selection():
    with pytest.raises(ValueError, match="train.timestep_selection"):
        from_dict(Config, {"train": {"timestep_selection": "latest"}})


def test_timesteps_per_pass_zero_stacks_all_trained_steps_whatever_their_number():
    from actors.rl.schedules import steps_per_pass
    from actors.workers.learner import deepspeed_config
    from orchestrator.config import load_preset

    for num_steps in (4, 10, 20):
        cfg = load_preset("toy-ddpo", [f"sampling.num_steps={num_steps}"])  # a fixed N would have to divide each
        trained = round(num_steps * cfg.train.timestep_fraction)
        assert steps_per_pass(cfg.learner, trained) == trained
        assert (
            deepspeed_config(cfg.learner, train_timesteps=trained)["gradient_accumulation_steps"] == cfg.learner.gradient_accumulation_steps
        )
    with pytest.raises(ValueError, match="learner.timesteps_per_pass must divide the 6 denoising steps"):
        load_preset("toy-ddpo", ["learner.timesteps_per_pass=4"])
