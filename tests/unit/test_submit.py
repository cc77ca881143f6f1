"""``rayalign submit`` without a cluster: the token lookup, the entrypoint check, the runtime_env."""

import shlex

import pytest

from jobs.submit import auth_error_message, find_auth_token, job_entrypoint, runtime_env


def test_token_is_found_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    assert find_auth_token({}, home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    assert find_auth_token({}, home) == "from-file"
    other = tmp_path / "token"
    other.write_text("  from-path  ")
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(other)}, home) == "from-path"
    # The variable wins over both files, as in Ray.
    assert find_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(other)}, home) == "from-env"


@pytest.mark.parametrize("content, message", [(None, "cannot be read"), ("", "is empty")])
def test_a_bad_token_path_is_an_error_not_a_silent_fallback(tmp_path, content, message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("would-be-used")
    with pytest.raises(ValueError, match=f"RAY_AUTH_TOKEN_PATH=.*{message}"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path)


def test_auth_errors_say_what_to_set():
    missing = auth_error_message("http://h:8265", "Authentication required: Unauthorized", token_sent=False)
    assert "requires an auth token" in missing and "RAY_AUTH_TOKEN" in missing and "ray get-auth-token" in missing
    wrong = auth_error_message("http://h:8265", "Authentication failed", token_sent=True)
    assert "rejected the auth token" in wrong and "~/.ray/auth_token" in wrong


def test_object_store_outputs_are_taken_as_they_are():
    args = ["--", "train", "--preset", "toy-ddpo", "--output-dir", "s3://team-bucket/runs/r1"]
    assert shlex.split(job_entrypoint(args))[-1] == "s3://team-bucket/runs/r1"
    eval_args = ["--", "eval", "--prompts", "toy-heldout", "--reward", "toy_fidelity", "--output", "gs://b/eval/r1.json"]
    assert shlex.split(job_entrypoint(eval_args))[-1] == "gs://b/eval/r1.json"


def test_entrypoint_is_the_rayalign_command_line():
    args = ["--", "train", "--preset", "toy-ddpo", "--set", "train.epochs=2", "--output-dir", "/runs/my run"]
    entrypoint = job_entrypoint(args)
    assert shlex.split(entrypoint) == [
        "rayalign",
        "train",
        "--preset",
        "toy-ddpo",
        "--set",
        "train.epochs=2",
        "--output-dir",
        "/runs/my run",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the rayalign command to run after --"),
        (["--"], "give the rayalign command to run after --"),
        (["submit", "--address", "x"], "cannot run `rayalign submit`"),
        (["train", "--preset", "toy-ddpo", "--output-dir", "runs/r1"], "--output-dir 'runs/r1' is relative"),
        (["eval", "--prompts", "toy-heldout", "--reward", "toy_fidelity", "--output", "out.json"], "--output 'out.json' is relative"),
        (["train", "--preset", "toy-ddpo", "--output-dir", "/runs/r1", "--epochs", "3"], "unrecognized arguments: --epochs 3"),
        (["trian", "--output-dir", "/r"], "is not a valid rayalign command line"),
        (["train", "--preset", "toy-ddpo"], "is not a valid rayalign command line"),
    ],
)
def test_bad_rayalign_arguments_fail_before_anything_is_uploaded(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        job_entrypoint(args)


def test_runtime_env(tmp_path):
    env = runtime_env(working_dir=str(tmp_path), env=["A=1", "B=x=y"])
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"]["A"] == "1" and env["env_vars"]["B"] == "x=y" and env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "working_dir" not in runtime_env(working_dir=None, env=[])
    with pytest.raises(ValueError, match="--working-dir .* is not a directory"):
        runtime_env(working_dir=str(tmp_path / "missing"), env=[])
    with pytest.raises(ValueError, match="--env 'A' must look like KEY=VALUE"):
        runtime_env(working_dir=None, env=["A"])
