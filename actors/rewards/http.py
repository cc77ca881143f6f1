"""The ``http`` reward: scores come from a remote scoring service (e.g. a VLM judge).

DDPO scored prompt alignment with LLaVA running on its own GPU server; this reward is
that plug: any service that speaks the small JSON protocol below can score images.

Request (``POST <url>``, ``Content-Type: application/json``), one per chunk of at most
``batch_size`` images::

    {"prompts":  ["a red circle on the left", ...],          one per image
     "images":   ["iVBORw0KGgo...", ...],                    base64 PNG, RGB, one per image
     "metadata": [{...}, ...]}                               one JSON object per image

Response: status 200 and ``{"scores": [float, ...], "info": {"name": number, ...}}`` with
exactly one finite score per image, in order; ``info`` is optional (numbers are averaged
over chunks and logged as ``reward/http/<name>``).

Failures: connection errors, timeouts, 429 and 5xx answers are retried ``retries`` times
with exponential backoff (``backoff_s``, then twice that, ...); any other status, or a
body that breaks the protocol, fails at once with an error naming the URL and the problem.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np
from pydantic import Field, model_validator

from actors.diffusion.images import encode_png
from actors.rewards.registry import Info, register_reward
from orchestrator.config import FieldError, Section

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Answers that mean "try again later": rate limiting and server-side failures."""


class HttpOptions(Section):
    """Options of the ``http`` reward."""

    url: str | None = None
    """Endpoint that scores images, e.g. "http://judge.internal:8000/score"; http or
    https. Required."""

    timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for one answer before the attempt counts as failed; > 0."""

    retries: int = Field(6, ge=0)
    """Further attempts after a failed one (connection error, timeout, 429, 5xx); >= 0.
    With the default backoff the last one is about a minute after the first: a judge that
    restarts, or is redeployed, is waited for rather than ending the run."""

    backoff_s: float = Field(1.0, ge=0)
    """Wait before the first retry; each later retry waits twice as long; >= 0."""

    batch_size: int = Field(16, ge=1)
    """Images per request; >= 1. Larger batches are sent as several requests."""

    auth_env: str | None = None
    """Name of an environment variable whose value is sent as the ``auth_header`` header
    (e.g. "Bearer ..."); null = no authentication. The variable must be set where the
    reward actors run (a Ray runtime_env can set it); the secret never enters the config."""

    auth_header: str = "Authorization"
    """Header that carries the secret from ``auth_env``."""

    @model_validator(mode="after")
    def _usable(self) -> "HttpOptions":
        if self.url is None:
            raise FieldError("url", "is required: the scoring service's endpoint, e.g. http://localhost:8000/score")
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise FieldError("url", f"must be an http:// or https:// URL with a host, got {self.url!r}")
        if self.auth_env is not None and not self.auth_env.strip():
            raise FieldError("auth_env", "must name an environment variable, or be null for no authentication")
        return self


def png_base64(image: np.ndarray) -> str:
    """One ``(H, W, 3)`` uint8 image as base64 PNG text (lossless, so the judge sees exact pixels)."""
    return base64.b64encode(encode_png(image)).decode("ascii")


def _json_value(value: Any) -> Any:
    """numpy scalars and arrays in metadata become plain JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


class _Retryable(Exception):
    """An attempt failed in a way that may succeed later."""


@register_reward("http")
class HttpReward:
    """Scores from a remote service over the JSON protocol in the module docstring."""

    name = "http"
    Options = HttpOptions

    def __init__(self, *, options: HttpOptions):
        if not isinstance(options, HttpOptions):
            raise TypeError(f"HttpReward needs HttpOptions, got {type(options).__name__}")
        self.options = options

    def __repr__(self) -> str:
        return f"HttpReward(url={self.options.url!r})"

    def load(self) -> None:
        """Check that the secret's environment variable is set where the reward runs."""
        self._headers()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.options.auth_env is not None:
            secret = os.environ.get(self.options.auth_env)
            if not secret:
                raise ValueError(
                    f"reward 'http': options.auth_env names ${self.options.auth_env}, which is not set where the reward "
                    f"runs; export it (for a Ray cluster, pass it in the job's runtime_env env_vars)"
                )
            headers[self.options.auth_header] = secret
        return headers

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, Info]:
        headers = self._headers()
        size = self.options.batch_size
        scores, infos, attempts = [], [], 0
        started = time.perf_counter()
        for start in range(0, len(images), size):
            chunk_scores, chunk_info, chunk_attempts = self._score_chunk(
                images[start : start + size], prompts[start : start + size], metadata[start : start + size], headers
            )
            scores.append(chunk_scores)
            infos.append(chunk_info)
            attempts += chunk_attempts
        info: Info = {key: float(np.mean([c[key] for c in infos if key in c])) for key in sorted({k for c in infos for k in c})}
        # Our own timing and retry count win over a service key of the same name.
        info.update({"request_s": time.perf_counter() - started, "retries": float(attempts - len(infos))})
        return np.concatenate(scores), info

    def _score_chunk(self, images, prompts, metadata, headers) -> tuple[np.ndarray, dict[str, float], int]:
        try:
            body = json.dumps(
                {"prompts": list(prompts), "images": [png_base64(image) for image in images], "metadata": [dict(m) for m in metadata]},
                default=_json_value,
            ).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"reward 'http': cannot send the batch as JSON: {error}; metadata values must be JSON numbers, strings, lists or dicts"
            ) from None
        url = self.options.url
        last_error = ""
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            if attempt:
                delay = self.options.backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "reward http: %s failed (%s); retry %d of %d in %.1fs", url, last_error, attempt, self.options.retries, delay
                )
                time.sleep(delay)
            try:
                payload = self._post(body, headers)
            except _Retryable as error:
                last_error = str(error)
                continue
            scores, info = self._parse(payload, len(images))
            return scores, info, attempt + 1
        raise ValueError(
            f"reward 'http': no answer from {url} after {attempts} attempt(s) (last error: {last_error}); "
            f"is the scoring service running and reachable from the reward actors? Check options.url, "
            f"or raise options.timeout_s / options.retries for a slow service"
        )

    def _post(self, body: bytes, headers: dict[str, str]) -> bytes:
        request = urllib.request.Request(self.options.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read(300).decode("utf-8", "replace").strip()
            if error.code in RETRY_STATUSES:
                raise _Retryable(f"HTTP {error.code} {detail!r}") from None
            raise ValueError(
                f"reward 'http': {self.options.url} answered HTTP {error.code} {error.reason} ({detail!r}); "
                + (
                    "check options.auth_env and the secret it names"
                    if error.code in (401, 403)
                    else "check options.url and the service's protocol"
                )
            ) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.options.timeout_s:g}s") from None
        except urllib.error.URLError as error:
            raise _Retryable(f"cannot connect: {error.reason}") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"connection broken: {error!r}") from None

    def _parse(self, payload: bytes, batch_size: int) -> tuple[np.ndarray, dict[str, float]]:
        url = self.options.url
        snippet = payload[:200].decode("utf-8", "replace")
        try:
            answer = json.loads(payload)
        except ValueError:
            raise ValueError(f"reward 'http': {url} answered something that is not JSON: {snippet!r}") from None
        if not isinstance(answer, dict) or "scores" not in answer:
            raise ValueError(f"reward 'http': {url} answered {snippet!r}; expected a JSON object with a 'scores' list")
        scores = answer["scores"]
        if not isinstance(scores, list) or len(scores) != batch_size:
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise ValueError(
                f"reward 'http': {url} returned {count} scores for {batch_size} images; expected a list of one score per image, in order"
            )
        bad = [i for i, s in enumerate(scores) if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)]
        if bad:
            raise ValueError(
                f"reward 'http': {url} returned non-numeric or non-finite scores at positions {bad}: {[scores[i] for i in bad][:5]}"
            )
        info = answer.get("info", {})
        if not isinstance(info, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in info.values()):
            raise ValueError(f"reward 'http': {url} returned info {info!r}; expected an object of name -> number")
        return np.asarray(scores, dtype=np.float32), {str(k): float(v) for k, v in info.items()}
