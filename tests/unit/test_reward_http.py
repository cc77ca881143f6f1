"""The ``http`` reward against a real local scoring service (tests/helpers/scoring_server.py)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from actors.rewards.registry import resolve_reward, score_batch
from actors.toy import world as toy_world
from jobs.bench.judge import Judge, decode_png
from tests.helpers.scoring_server import ScoringServer


def toy_batch(size: int):
    prompts = toy_world.train_prompts()[:size]
    return toy_world.render_batch(prompts, range(size)), prompts


def http_reward(url: str, **options):
    return resolve_reward("http", {"url": url, "timeout_s": 5, "backoff_s": 0.01, **options})


@pytest.fixture
def server():
    """A fresh service per test, so scripted misbehaviour and request logs do not leak."""
    with ScoringServer() as server:
        yield server


def test_scores_come_back_in_order_and_the_request_follows_the_protocol(server):
    images, prompts = toy_batch(5)
    metadata = [{"seed": np.int64(i), "step": i} for i in range(5)]
    scores, info = score_batch(http_reward(server.url, batch_size=2), images, prompts, metadata)

    expected = images.reshape(5, -1).astype(np.float64).mean(axis=1) / 255.0  # the service's brightness
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert len(server.requests) == 3  # 5 images at batch_size 2: requests of 2, 2 and 1
    sent = [image for request in server.requests for image in request["images"]]
    np.testing.assert_array_equal(np.stack([decode_png(text) for text in sent]), images)  # PNG is lossless
    assert [p for request in server.requests for p in request["prompts"]] == prompts
    assert [m for request in server.requests for m in request["metadata"]] == [{"seed": i, "step": i} for i in range(5)]
    assert server.headers[0]["Content-Type"] == "application/json"
    assert info["judge_ms"] == 1.5 and info["retries"] == 0.0 and info["request_s"] > 0


def test_auth_header_comes_from_the_named_environment_variable(monkeypatch):
    images, prompts = toy_batch(2)
    with ScoringServer(token="Bearer s3cret") as server:
        monkeypatch.setenv("JUDGE_TOKEN", "Bearer s3cret")
        scores, _ = score_batch(http_reward(server.url, auth_env="JUDGE_TOKEN"), images, prompts)
        assert scores.shape == (2,)
        monkeypatch.setenv("JUDGE_TOKEN", "Bearer wrong")
        with pytest.raises(ValueError, match=r"answered HTTP 401.*check options.auth_env"):
            score_batch(http_reward(server.url, auth_env="JUDGE_TOKEN"), images, prompts)
        monkeypatch.delenv("JUDGE_TOKEN")
        reward = http_reward(server.url, auth_env="JUDGE_TOKEN")
        with pytest.raises(ValueError, match=r"\$JUDGE_TOKEN, which is not set where the reward runs"):
            reward.load()


def test_retries_a_failing_service_then_succeeds(server):
    server.script = ["503", "503"]
    images, prompts = toy_batch(3)
    scores, info = score_batch(http_reward(server.url, retries=2), images, prompts)
    assert len(server.requests) == 3 and info["retries"] == 2.0
    np.testing.assert_allclose(scores, images.reshape(3, -1).mean(axis=1) / 255.0, rtol=1e-6)


def test_gives_up_after_the_retries_naming_the_last_error(server):
    server.script = ["503"] * 3
    with pytest.raises(ValueError, match=r"no answer from .*/score after 3 attempt\(s\) \(last error: HTTP 503"):
        score_batch(http_reward(server.url, retries=2), *toy_batch(2))


def test_timeout_counts_as_a_failed_attempt(server):
    server.script = ["slow", "slow"]  # each answer takes 1 s
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"after 2 attempt\(s\) \(last error: timed out after 0.2s\).*options.timeout_s"):
        score_batch(http_reward(server.url, timeout_s=0.2, retries=1), *toy_batch(2))
    assert time.perf_counter() - started < 1.5  # gave up at the timeouts, did not wait for the answers


def test_backoff_doubles_between_retries(server):
    server.script = ["503", "503", "503"]
    started = time.perf_counter()
    with pytest.raises(ValueError):
        score_batch(http_reward(server.url, retries=2, backoff_s=0.2), *toy_batch(1))
    assert time.perf_counter() - started >= 0.2 + 0.4


def test_server_down_is_a_clear_error():
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(
        ValueError,
        match=r"no answer from http://127.0.0.1:\d+/score after 2 attempt\(s\) "
        r"\(last error: cannot connect.*is the scoring service running",
    ):
        score_batch(http_reward(f"http://127.0.0.1:{port}/score", retries=1), *toy_batch(2))


def test_a_service_killed_and_started_again_is_waited_for():
    # The judge's process is SIGKILLed (connections refused), and comes back 2 s later on the same
    # port: the reward keeps retrying with backoff and scores the batch once it answers.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(port).start()
    images, prompts = toy_batch(3)
    reward = http_reward(judge.url, retries=5, backoff_s=0.25)  # waits up to 0.25 + 0.5 + 1 + 2 + 4 s
    judge.kill()
    comeback = threading.Timer(2.0, judge.start)
    comeback.start()
    try:
        started = time.perf_counter()
        scores, info = score_batch(reward, images, prompts)
        waited = time.perf_counter() - started
    finally:
        comeback.join()
        judge.kill()
    assert waited >= 2.0 and info["retries"] >= 3
    np.testing.assert_allclose(scores, images.reshape(3, -1).mean(axis=1) / 255.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("garbage", r"answered something that is not JSON: '<html>not json</html>'"),
        ("short", r"returned 1 scores for 2 images; expected a list of one score per image"),
        ("nan", r"non-numeric or non-finite scores at positions \[0\]"),
        ("no_scores", r"expected a JSON object with a 'scores' list"),
        ("bad_info", r"returned info \{'verdict': 'good'\}; expected an object of name -> number"),
        ("404", r"answered HTTP 404.*check options.url"),
    ],
)
def test_bad_answers_fail_at_once_without_retrying(server, mode, match):
    server.script = [mode]
    with pytest.raises(ValueError, match=match):
        score_batch(http_reward(server.url, retries=3), *toy_batch(2))
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, r"options.url is required"),
        ({"url": "localhost:8000/score"}, r"options.url must be an http:// or https:// URL with a host"),
        ({"url": "http://x/score", "timeout_s": 0}, r"options.timeout_s must be > 0"),
        ({"url": "http://x/score", "retries": -1}, r"options.retries must be >= 0"),
        ({"url": "http://x/score", "auth_env": " "}, r"options.auth_env must name an environment variable"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=rf"reward 'http': {match}"):
        resolve_reward("http", options)


def test_metadata_that_is_not_json_is_a_clear_error(server):
    images, prompts = toy_batch(1)
    with pytest.raises(ValueError, match=r"cannot send the batch as JSON.*object"):
        score_batch(http_reward(server.url), images, prompts, [{"thing": object()}])
