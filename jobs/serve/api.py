"""The HTTP API of ``rayalign serve``, as pure functions: parsing, checking, answering.

Compatible with the OpenAI Images API (``POST /v1/images/generations``, ``GET
/v1/models``, errors as ``{"error": {"message", "type", "param", "code"}}``), so
OpenAI clients work with ``base_url`` pointed at the server. Nothing here needs Ray or
torch; :mod:`jobs.serve.app` wires it to the deployment.

Every bad request is a :class:`RequestError` with the HTTP status, the offending field
and a message that says what is allowed; the server never answers bad input with a 5xx.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import math
import random
from typing import Any, Sequence

from orchestrator.config import ServeLimitsConfig
from orchestrator.rundir import SamplerSettings

API_KEY_ENV = "RAYALIGN_API_KEY"
"""Environment variable with the API key; unset or empty = no authentication."""

MAX_SEED = 2**32 - 1

_FIELDS = ("prompt", "n", "size", "response_format", "model", "user", "seed", "num_inference_steps", "guidance_scale")
"""Accepted request fields. ``user`` is OpenAI's end-user tag: accepted and ignored."""


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A checked ``POST /v1/images/generations`` body."""

    prompt: str
    n: int
    size: str
    seed: int
    """Seed of the first image; image i uses ``(seed + i) mod 2**32`` (see :func:`image_seeds`)."""
    seed_given: bool
    num_inference_steps: int
    guidance_scale: float
    model: str


def size_text(height: int, width: int) -> str:
    """OpenAI's ``WIDTHxHEIGHT`` notation."""
    return f"{width}x{height}"


def image_seeds(seed: int, n: int) -> tuple[int, ...]:
    """Seeds of a request's ``n`` images: consecutive, so image i alone is ``seed + i`` with ``n = 1``."""
    return tuple((seed + i) % (MAX_SEED + 1) for i in range(n))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(body: dict, name: str, *, default: int, low: int, high: int, hint: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)}", param=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}{hint}, got {value}", param=name)
    return value


def parse_generation_request(
    body: bytes,
    *,
    limits: ServeLimitsConfig,
    defaults: SamplerSettings,
    sizes: Sequence[str],
    models: Sequence[str],
    rng: random.Random | None = None,
) -> GenerationRequest:
    """Check an image request body against the server's limits.

    ``defaults`` fill in the steps and guidance a request leaves out (the served adapter's
    training settings, unless the server config sets others); ``sizes`` are the image
    sizes the model makes (``["32x32"]`` for the toy model); ``models`` the served model
    ids, the default first. Raises :class:`RequestError`.
    """
    if len(body) > limits.max_body_bytes:
        raise RequestError(f"request body is {len(body)} bytes; the limit is {limits.max_body_bytes}", status=413)
    try:
        # NaN and Infinity are not JSON, though Python's parser takes them by default.
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise RequestError(f'request body is not valid JSON ({error}); send a JSON object such as {{"prompt": "a red circle"}}') from None
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object with a 'prompt', got a JSON {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise RequestError(f"unknown field '{unknown[0]}'; accepted fields: {', '.join(_FIELDS)}", param=unknown[0])

    prompt = data.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", param="prompt")
    if not isinstance(prompt, str):
        raise RequestError(f"'prompt' must be a string, got {json.dumps(prompt)}", param="prompt")
    if not prompt.strip():
        raise RequestError("'prompt' must not be empty", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(f"'prompt' is {len(prompt)} characters; the limit is {limits.max_prompt_chars}", param="prompt")

    n = _int_field(data, "n", default=1, low=1, high=limits.max_n)
    num_steps = _int_field(data, "num_inference_steps", default=defaults.num_steps, low=1, high=limits.max_steps)
    seed_given = data.get("seed") is not None
    seed = _int_field(data, "seed", default=(rng or random.SystemRandom()).randint(0, MAX_SEED), low=0, high=MAX_SEED)

    guidance = data.get("guidance_scale")
    if guidance is None:
        guidance = defaults.guidance_scale
    elif isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise RequestError(f"'guidance_scale' must be a number, got {json.dumps(guidance)}", param="guidance_scale")
    elif not (math.isfinite(guidance) and 1.0 <= guidance <= limits.max_guidance_scale):
        raise RequestError(
            f"'guidance_scale' must be between 1 (no guidance) and {limits.max_guidance_scale}, got {guidance}", param="guidance_scale"
        )

    size = data.get("size")
    if size is None:
        size = sizes[0]
    elif not isinstance(size, str) or size not in sizes:
        raise RequestError(
            f"'size' must be one of {', '.join(repr(s) for s in sizes)} (what this model makes), got {json.dumps(size)}", param="size"
        )

    response_format = data.get("response_format")
    if response_format is not None and response_format != "b64_json":
        raise RequestError(
            f"'response_format' must be \"b64_json\" (this server keeps no image files to link to), got {json.dumps(response_format)}",
            param="response_format",
        )

    model = data.get("model")
    if model is None:
        model = models[0]
    elif not isinstance(model, str) or model not in models:
        raise RequestError(
            f"'model' must be one of {', '.join(repr(m) for m in models)}, got {json.dumps(model)}", param="model", code="model_not_found"
        )

    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"'user' must be a string, got {json.dumps(user)}", param="user")

    return GenerationRequest(
        prompt=prompt,
        n=n,
        size=size,
        seed=seed,
        seed_given=seed_given,
        num_inference_steps=num_steps,
        guidance_scale=float(guidance),
        model=model,
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_api_key(authorization: str | None, expected: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <expected>``; no key expected = open."""
    if not expected:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError("missing API key: send the header 'Authorization: Bearer <key>'", status=401, code="invalid_api_key")
    # Constant-time comparison: the time taken must not reveal how much of the key matched.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise RequestError("incorrect API key", status=401, code="invalid_api_key")


def generation_response(
    *,
    created: int,
    model: str,
    adapter_version: str | None,
    request: GenerationRequest,
    eta: float,
    pngs: Sequence[bytes],
    sde_window: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The OpenAI images response, plus each image's seed, the weights and the sampler settings that made it
    (``sde_window`` only when a flow adapter's window was used)."""
    seeds = image_seeds(request.seed, request.n)
    sampling = {"num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale, "eta": eta}
    if sde_window is not None:
        sampling["sde_window"] = list(sde_window)
    return {
        "created": created,
        "model": model,
        "adapter_version": adapter_version,
        "size": request.size,
        "output_format": "png",
        "sampling": sampling,
        "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed} for png, seed in zip(pngs, seeds)],
    }
