"""``rayalign submit``: run a ``rayalign`` command as a Ray Job on a cluster and follow it.

The same as ``ray job submit --address URL [--working-dir DIR] -- rayalign ARGS``, plus
what that leaves to the user: the rayalign arguments are checked here before anything
is uploaded, the cluster's auth token is picked up, and the exit status is the job's.

Ray (since 2.52, by default for ``ray start`` since 2.59) protects the dashboard and the
Jobs API with a bearer token. The token is looked up as Ray itself does:
``$RAY_AUTH_TOKEN``, else the file named by ``$RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``; it is sent whether or not ``RAY_AUTH_MODE=token`` is set here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from actors.storage import is_uri
from jobs.cli import build_parser

logger = logging.getLogger(__name__)

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120.0
"""How long to retry while a freshly started cluster has no job agent yet."""

# Flags whose value is a path the job writes to: relative, it would land in the job's
# temporary copy of the working directory on the cluster and be lost with it.
_OUTPUT_FLAGS = ("--output-dir", "--output")

_TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the cluster's token (on the head node: `ray get-auth-token`), "
    "or write it to ~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at a file holding it"
)


def find_auth_token(environ: Mapping[str, str], home: Path) -> str | None:
    """The Ray auth token from the environment or the default file, or None if there is none.

    Raises:
        ValueError: ``$RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty.
    """
    token = environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path_text = environ.get(TOKEN_PATH_ENV, "").strip()
    if path_text:
        try:
            token = Path(path_text).expanduser().read_text().strip()
        except OSError as error:
            raise ValueError(
                f"{TOKEN_PATH_ENV}={path_text!r} cannot be read ({error.strerror or error}); fix the path or unset it"
            ) from None
        if not token:
            raise ValueError(f"{TOKEN_PATH_ENV}={path_text!r} is empty; write the cluster's token into it or unset it")
        return token
    default = home / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text().strip() or None
    return None


def job_entrypoint(rayalign_args: Sequence[str]) -> str:
    """The job's shell command for ``rayalign ARGS``, after checking ARGS here.

    Checking locally turns a typo into an immediate error instead of a failed job after
    an upload; the config itself is validated by the job (its file may exist only on
    the cluster).

    Raises:
        ValueError: no command, ``submit`` itself, arguments ``rayalign`` rejects, or a
            relative output path.
    """

    args = list(rayalign_args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise ValueError(
            "give the rayalign command to run after --, e.g. rayalign submit --address URL -- train --preset toy-ddpo --output-dir /runs/r1"
        )
    if args[0] == "submit":
        raise ValueError("a job cannot run `rayalign submit`; give the command the job should run, e.g. -- train ...")
    parser = build_parser()
    try:
        parsed, unknown = parser.parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as error:
        # argparse still exits (after printing usage) for a missing required argument.
        raise ValueError(
            f"`rayalign {shlex.join(args)}` is not a valid rayalign command line "
            f"({error if isinstance(error, argparse.ArgumentError) else 'see the usage above'})"
        ) from None
    if unknown:
        raise ValueError(f"rayalign {shlex.join(args)}: unrecognized arguments: {' '.join(unknown)}")
    for flag in _OUTPUT_FLAGS:
        dest = flag[2:].replace("-", "_")
        value = getattr(parsed, dest, None)
        if value is not None and not is_uri(value) and not Path(value).is_absolute():
            raise ValueError(
                f"{flag} {value!r} is relative: a job runs in a temporary copy of its working directory, so the output "
                f"would be lost; give an object-store URI (e.g. {flag} s3://BUCKET/runs/{Path(value).name}) or an absolute "
                f"path on storage the cluster's nodes share (e.g. {flag} /runs/{Path(value).name})"
            )
    return shlex.join(["rayalign", *args])


def runtime_env(*, working_dir: str | None, env: Sequence[str]) -> dict[str, Any]:
    """The job's runtime_env: the working directory to upload and environment variables.

    Raises:
        ValueError: the working directory is missing, or an ``--env`` item is not ``KEY=VALUE``.
    """
    env_vars = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key or key != key.strip():
            raise ValueError(f"--env {item!r} must look like KEY=VALUE, e.g. --env RAYALIGN_API_KEY=secret")
        env_vars[key] = value
    out: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        path = Path(working_dir).expanduser()
        if not path.is_dir():
            raise ValueError(f"--working-dir {working_dir!r} is not a directory")
        out["working_dir"] = str(path.resolve())
    return out


def connect(address: str, *, token: str | None):
    """A ``JobSubmissionClient`` for ``address``, with errors that say what to fix."""

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as error:
        raise ValueError(auth_error_message(address, str(error), token_sent=token is not None)) from None
    except ConnectionError as error:
        raise ValueError(
            f"no Ray dashboard answers at {address} ({error}); check the cluster is up and that --address is its "
            f"dashboard URL (http://HOST:8265 by default)"
        ) from None


def auth_error_message(address: str, detail: str, *, token_sent: bool) -> str:
    """The one-line error for a 401/403 from the Jobs API."""
    if token_sent:
        return f"the Ray cluster at {address} rejected the auth token (401/403): the token is wrong for this cluster; {_TOKEN_HELP}"
    first = detail.strip().splitlines()[0] if detail.strip() else "401 Unauthorized"
    return f"the Ray cluster at {address} requires an auth token ({first}); {_TOKEN_HELP}"


def submit(
    *,
    address: str,
    rayalign_args: Sequence[str],
    working_dir: str | None = None,
    env: Sequence[str] = (),
    submission_id: str | None = None,
    wait: bool = True,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Submit ``rayalign ARGS`` as a job; follow its logs unless ``wait`` is False.

    Returns 0 when the job succeeded (or was submitted, without ``wait``), 1 when it
    failed or was stopped.
    """

    out = out or sys.stdout
    entrypoint = job_entrypoint(rayalign_args)
    env_spec = runtime_env(working_dir=working_dir, env=env)
    token = find_auth_token(os.environ if environ is None else environ, Path.home())
    client = connect(address, token=token)
    try:
        job_id = _submit_when_ready(client, entrypoint=entrypoint, runtime_env=env_spec, submission_id=submission_id, out=out)
    except AuthenticationError as error:
        raise ValueError(auth_error_message(address, str(error), token_sent=token is not None)) from None
    except RuntimeError as error:
        raise ValueError(f"the cluster at {address} refused the job: {error}") from None
    print(f"submitted job {job_id}: {entrypoint}", file=out, flush=True)
    hint = f"--address {shlex.quote(address)}"
    if not wait:
        print(f"follow it with: ray job logs {job_id} {hint} --follow; status: ray job status {job_id} {hint}", file=out, flush=True)
        return 0
    try:
        asyncio.run(_print_logs(client, job_id, out))
        status, message = _final_status(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (stop it with: ray job stop {job_id} {hint})", file=out, flush=True)
        return 130
    print(f"job {job_id} {status}" + (f": {message}" if message and status != "SUCCEEDED" else ""), file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _submit_when_ready(
    client, *, entrypoint: str, runtime_env: dict[str, Any], submission_id: str | None, out: TextIO, timeout_s: float = AGENT_WAIT_S
) -> str:
    """Submit, waiting while a cluster that has just started has no job agent yet."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            if not waited:
                print(f"the cluster's job agent is not up yet; retrying for up to {timeout_s:.0f}s ...", file=out, flush=True)
                waited = True
            time.sleep(2.0)


async def _print_logs(client, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _final_status(client, job_id: str, timeout_s: float = 60.0) -> tuple[str, str]:
    """The job's terminal status and message (the log stream can end a moment before it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL_STATES or time.monotonic() > deadline:
            return status, info.message or ""
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    """``rayalign submit``."""
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("give --address http://HEAD:8265 (the dashboard URL) or set RAY_ADDRESS")
    return submit(
        address=address,
        rayalign_args=args.rayalign_args,
        working_dir=args.working_dir,
        env=args.env,
        submission_id=args.submission_id,
        wait=not args.no_wait,
    )
