"""The image API's request checks, auth and responses, without Ray or a model."""

import base64
import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from actors.diffusion.images import encode_png
from jobs.serve.api import (
    MAX_SEED,
    RequestError,
    check_api_key,
    generation_response,
    image_seeds,
    parse_generation_request,
)
from orchestrator.config import ServeLimitsConfig
from orchestrator.rundir import SamplerSettings

LIMITS = ServeLimitsConfig(max_prompt_chars=40, max_n=3, max_steps=30, max_guidance_scale=9.0, max_body_bytes=2048)
DEFAULTS = SamplerSettings(num_steps=7, eta=0.5, guidance_scale=3.0)
MODELS = ["toy-t2i+lora", "toy-t2i"]


def parse(body, **kwargs):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_generation_request(raw, limits=LIMITS, defaults=DEFAULTS, sizes=["32x32"], models=MODELS, **kwargs)


def test_defaults_come_from_the_server_and_the_model():
    request = parse({"prompt": "a red circle on the left"}, rng=random.Random(0))
    assert (request.n, request.size, request.num_inference_steps, request.guidance_scale, request.model) == (
        1,
        "32x32",
        7,
        3.0,
        "toy-t2i+lora",
    )
    assert not request.seed_given and 0 <= request.seed <= MAX_SEED


def test_every_field_is_read():
    request = parse(
        {
            "prompt": "a blue square",
            "n": 3,
            "size": "32x32",
            "response_format": "b64_json",
            "model": "toy-t2i",
            "user": "u-1",
            "seed": 12,
            "num_inference_steps": 30,
            "guidance_scale": 1,
        }
    )
    assert (request.n, request.seed, request.seed_given, request.num_inference_steps, request.guidance_scale, request.model) == (
        3,
        12,
        True,
        30,
        1.0,
        "toy-t2i",
    )


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({}, "prompt", "'prompt' is required"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   \n"}, "prompt", "must not be empty"),
        ({"prompt": ["a", "b"]}, "prompt", "must be a string"),
        ({"prompt": "x" * 41}, "prompt", "41 characters; the limit is 40"),
        ({"prompt": "ok", "n": 0}, "n", "between 1 and 3"),
        ({"prompt": "ok", "n": 4}, "n", "between 1 and 3"),
        ({"prompt": "ok", "n": 2.0}, "n", "must be an integer"),
        ({"prompt": "ok", "n": True}, "n", "must be an integer"),
        ({"prompt": "ok", "n": "2"}, "n", "must be an integer"),
        ({"prompt": "ok", "num_inference_steps": 0}, "num_inference_steps", "between 1 and 30"),
        ({"prompt": "ok", "num_inference_steps": 31}, "num_inference_steps", "between 1 and 30"),
        ({"prompt": "ok", "guidance_scale": 0.5}, "guidance_scale", "between 1 (no guidance) and 9.0"),
        ({"prompt": "ok", "guidance_scale": 9.5}, "guidance_scale", "between 1 (no guidance) and 9.0"),
        ({"prompt": "ok", "guidance_scale": "high"}, "guidance_scale", "must be a number"),
        ({"prompt": "ok", "size": "512x512"}, "size", "'32x32' (what this model makes)"),
        ({"prompt": "ok", "size": 32}, "size", "must be one of '32x32'"),
        ({"prompt": "ok", "response_format": "url"}, "response_format", 'must be "b64_json"'),
        ({"prompt": "ok", "model": "dall-e-3"}, "model", "'toy-t2i+lora', 'toy-t2i'"),
        ({"prompt": "ok", "seed": -1}, "seed", f"between 0 and {MAX_SEED}"),
        ({"prompt": "ok", "seed": 2**32}, "seed", f"between 0 and {MAX_SEED}"),
        ({"prompt": "ok", "seed": "7"}, "seed", "must be an integer"),
        ({"prompt": "ok", "user": 5}, "user", "must be a string"),
        ({"prompt": "ok", "quality": "hd"}, "quality", "unknown field 'quality'; accepted fields: prompt, n"),
        ({"prompt": "ok", "stream": True}, "stream", "unknown field 'stream'"),
    ],
)
def test_bad_fields_are_400_naming_the_field(body, param, words):
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert words in caught.value.message
    error = caught.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and words in error["message"]


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"prompt": "a red circle"', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"prompt": "ok", "guidance_scale": NaN}', "NaN is not a JSON number"),
        (b'{"prompt": "ok", "guidance_scale": Infinity}', "Infinity is not a JSON number"),
        (b'["a red circle"]', "must be a JSON object"),
        (b'"a red circle"', "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400(raw, words):
    with pytest.raises(RequestError) as caught:
        parse(raw)
    assert caught.value.status == 400 and words in caught.value.message


def test_oversized_body_is_413():
    with pytest.raises(RequestError) as caught:
        parse(json.dumps({"prompt": "x" * 3000}).encode())
    assert caught.value.status == 413 and "the limit is 2048" in caught.value.message


def test_image_seeds_are_consecutive_and_wrap_at_2_to_the_32():
    assert image_seeds(5, 3) == (5, 6, 7)
    assert image_seeds(MAX_SEED, 2) == (MAX_SEED, 0)


@pytest.mark.parametrize(
    "header, expected, words",
    [
        (None, "s3cret", "missing API key"),
        ("", "s3cret", "missing API key"),
        ("Bearer", "s3cret", "missing API key"),
        ("Basic s3cret", "s3cret", "missing API key"),
        ("Bearer s3cre", "s3cret", "incorrect API key"),
        ("Bearer s3cret-and-more", "s3cret", "incorrect API key"),
    ],
)
def test_wrong_or_missing_key_is_401(header, expected, words):
    with pytest.raises(RequestError) as caught:
        check_api_key(header, expected)
    assert caught.value.status == 401 and words in caught.value.message
    assert caught.value.body()["error"]["type"] == "authentication_error"


def test_right_key_or_no_key_configured_passes():
    check_api_key("Bearer s3cret", "s3cret")
    check_api_key("bearer s3cret", "s3cret")  # the scheme is case-insensitive (RFC 7235)
    check_api_key(None, None)
    check_api_key("Bearer anything", None)


def test_png_bytes_depend_only_on_pixels():
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    first, second = encode_png(image), encode_png(image.copy())
    assert first == second
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first))), image)
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert encode_png(changed) != first


def test_response_is_openai_shaped_with_seeds():
    request = parse({"prompt": "ok", "n": 2, "seed": 40})
    pngs = [encode_png(np.full((32, 32, 3), v, dtype=np.uint8)) for v in (10, 200)]
    response = generation_response(created=1700000000, model="toy-t2i", adapter_version=None, request=request, eta=0.5, pngs=pngs)
    assert response["created"] == 1700000000 and response["size"] == "32x32"
    assert [item["seed"] for item in response["data"]] == [40, 41]
    assert [base64.b64decode(item["b64_json"]) for item in response["data"]] == pngs
    # What made the images is part of the answer: the request's steps and guidance, the server's eta.
    assert response["sampling"] == {"num_inference_steps": 7, "guidance_scale": 3.0, "eta": 0.5}
    # a flow adapter served with its training window says so; without one the key is absent
    windowed = generation_response(created=1, model="toy-sd3", adapter_version="v", request=request, eta=0.7, pngs=pngs, sde_window=(0, 6))
    assert windowed["sampling"] == {"num_inference_steps": 7, "guidance_scale": 3.0, "eta": 0.7, "sde_window": [0, 6]}
