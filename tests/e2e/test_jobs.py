"""``rayalign submit`` against a real Ray head (``ray start --head``, token auth on)."""

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.metrics import read_metrics
from orchestrator.rundir import RunDir
from tests.helpers.ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
# A seconds-per-epoch run of the toy preset: 8 samples, 4 DDIM steps, one learner.
SMALL = [
    "--set",
    "train.epochs=1",
    "--set",
    "train.samples_per_epoch=8",
    "--set",
    "sampling.num_steps=4",
    "--set",
    "sampling.batch_size=8",
    "--set",
    "learner.num_workers=1",
    "--set",
    "learner.micro_batch_size=4",
    "--set",
    "learner.gradient_accumulation_steps=1",
    "--set",
    "train.stat_min_count=2",
    "--set",
    "train.eval_every=0",
    "--set",
    "pools.reference.num_actors=0",
    "--set",
    "pools.rollout.num_cpus=1",
]


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=8) as running:
        yield running


def submit(head, *args, token="head", timeout=300):
    """``rayalign submit`` from a user's shell: RAY_AUTH_MODE unset, the token (if any) in RAY_AUTH_TOKEN."""
    env = dict(head.env, PYTHONUNBUFFERED="1", HOME=str(head.temp_dir))  # HOME: no ~/.ray/auth_token to fall back on
    env.pop("RAY_AUTH_MODE")
    env.pop("RAY_AUTH_TOKEN")
    if token is not None:
        env["RAY_AUTH_TOKEN"] = head.token if token == "head" else token
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", head.dashboard_url, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_training_job_succeeds_and_writes_its_run(head, tmp_path):
    run = tmp_path / "run"
    result = submit(head, "--working-dir", REPO, "--", "train", "--preset", "toy-ddpo", *SMALL, "--output-dir", run, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    assert f"job {job_id} SUCCEEDED" in result.stdout
    assert "epoch   1/1 | reward" in result.stdout  # the job's log, followed live
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["samples"] == 8
    latest = RunDir(run).latest_checkpoint()
    assert latest is not None and (latest.lora / "pytorch_lora_weights.safetensors").is_file()


def test_bad_config_job_fails_with_the_clear_error_in_its_log(head, tmp_path):
    result = submit(head, "--", "train", "--preset", "toy-ddpo", "--set", "sampling.eta=0", "--output-dir", tmp_path / "bad")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sampling.eta must be > 0 and <= 1, got 0" in result.stdout
    assert "FAILED" in result.stdout


def test_no_wait_returns_the_id_at_once(head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    result = submit(
        head,
        "--no-wait",
        "--submission-id",
        "rayalign-no-wait-test",
        "--",
        "train",
        "--preset",
        "toy-ddpo",
        "--set",
        "train.epochs=0",
        "--output-dir",
        tmp_path / "x",
    )
    assert result.returncode == 0, result.stderr
    assert "submitted job rayalign-no-wait-test" in result.stdout and "ray job logs rayalign-no-wait-test" in result.stdout
    client = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})
    assert client.get_job_info("rayalign-no-wait-test").entrypoint.startswith("rayalign train --preset toy-ddpo")


def test_without_the_token_the_error_says_what_to_set(head, tmp_path):
    result = submit(head, "--", "train", "--preset", "toy-ddpo", "--output-dir", tmp_path / "x", token=None)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "requires an auth token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr and "Traceback" not in result.stderr
    wrong = submit(head, "--", "train", "--preset", "toy-ddpo", "--output-dir", tmp_path / "x", token="not-the-token")
    assert wrong.returncode == 2 and "rejected the auth token" in wrong.stderr, wrong.stdout + wrong.stderr
    assert not (tmp_path / "x").exists()
