"""What `rayalign train` does with an output directory before anything starts (no Ray)."""

import pytest

from orchestrator import rundir
from orchestrator.config import config_to_yaml, load_preset
from orchestrator.run import resolve_run
from orchestrator.rundir import RunDir


def test_resume_with_nothing_to_resume_starts_the_run(tmp_path):
    cfg = load_preset("toy-ddpo")
    assert resolve_run(cfg, RunDir(tmp_path / "new"), resume=True) == (cfg, None)
    with pytest.raises(ValueError, match="no --preset or --config to start the run with"):
        resolve_run(None, RunDir(tmp_path / "new"), resume=True)


def test_resume_of_a_run_that_died_before_its_first_checkpoint_moves_it_aside(tmp_path):
    cfg = load_preset("toy-ddpo")
    run = RunDir(tmp_path / "run")
    run.config.write_text(config_to_yaml(cfg))
    run.metrics.write_text('{"epoch": 1}\n')
    assert resolve_run(cfg, run, resume=True) == (cfg, None)
    assert not run.root.exists()
    aside = RunDir(tmp_path / "run.incomplete-1")
    assert aside.metrics.read_text() == '{"epoch": 1}\n'  # kept, not deleted
    # A run with a complete checkpoint is resumed, not moved.
    run.config.write_text(config_to_yaml(cfg))
    rundir.commit_checkpoint(run, rundir.begin_checkpoint(run, 1), keep=2)
    (run.checkpoint(1).config).write_text(config_to_yaml(cfg))
    assert resolve_run(cfg, run, resume=True)[1] == run.checkpoint(1)
    with pytest.raises(ValueError, match="already holds a run"):
        resolve_run(cfg, run, resume=False)
