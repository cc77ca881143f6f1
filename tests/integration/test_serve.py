"""The Serve application over real HTTP on loopback: API, page, batching, hot swap, limits, auth.

One deployment for the module (a tiny random pipeline, batches of 4, an API key),
deployed through the same declarative path as ``rayalign serve`` and ``serveConfigV2``.
"""

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import (
    ServeBatchingConfig,
    ServeConfig,
    ServeLimitsConfig,
    ServeScalingConfig,
)
from tests.helpers.adapters import make_adapter

KEY = "test-key-5b1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Headless Chromium on a closed network: without the background-networking flags its
# own connections are refused many at a time.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    def __init__(self, url, config):
        self.url, self.config = url, config

    def request(self, method, path, body=None, headers=AUTH, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    def json(self, method, path, body=None, **kwargs):
        status, payload, _ = self.request(method, path, body, **kwargs)
        return status, json.loads(payload)

    def generate(self, **body):
        status, payload = self.json("POST", "/v1/images/generations", {"num_inference_steps": 3, **body})
        assert status == 200, payload
        return payload

    def health(self):
        return self.json("GET", "/healthz", headers=None)[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_pipeline_dir):
    from ray import serve

    from jobs.serve.app import deploy

    config = ServeConfig(
        model=str(tiny_pipeline_dir),
        device="cpu",
        limits=ServeLimitsConfig(max_n=3, default_steps=3, max_steps=10, max_prompt_chars=60),
        batching=ServeBatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.25),
        scaling=ServeScalingConfig(num_cpus_per_replica=1.0, max_ongoing_requests=16),
    )
    port = free_port()
    deploy(config, host="127.0.0.1", port=port, lora=None, api_key=KEY)
    yield Server(f"http://127.0.0.1:{port}", config)
    serve.shutdown()


def png_array(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_images_api_is_openai_compatible_and_reproducible(server):
    before = int(time.time())
    body = {"prompt": "a red circle on the left", "n": 2, "size": "32x32", "response_format": "b64_json", "seed": 11, "guidance_scale": 3.0}
    first = server.generate(**body)
    assert before <= first["created"] <= time.time() + 1
    assert [item["seed"] for item in first["data"]] == [11, 12]
    images = [png_array(item) for item in first["data"]]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in images)
    assert not np.array_equal(images[0], images[1])
    again = server.generate(**body)
    assert [item["b64_json"] for item in again["data"]] == [item["b64_json"] for item in first["data"]]
    # Image 1 of seed 11 is image 0 of seed 12: a single image can be reproduced from its seed.
    assert server.generate(**{**body, "n": 1, "seed": 12})["data"][0]["b64_json"] == first["data"][1]["b64_json"]
    other_settings = server.generate(**{**body, "guidance_scale": 5.0})
    assert other_settings["data"][0]["b64_json"] != first["data"][0]["b64_json"]


def test_concurrent_requests_share_batches_without_changing_images(server):
    target = {"prompt": "a blue square at the top", "seed": 99}
    alone = server.generate(**target)["data"][0]["b64_json"]
    stats_before = server.health()["stats"]
    bodies = [{"prompt": f"a green triangle {'on the left' if i % 2 else 'at the bottom'}", "seed": i} for i in range(7)] + [target]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda b: server.generate(**b), bodies))
    stats = server.health()["stats"]
    images, batches = stats["images"] - stats_before["images"], stats["batches"] - stats_before["batches"]
    assert images == 8 and batches < 8 and stats["largest_batch"] > 1  # requests were batched together
    assert responses[-1]["data"][0]["b64_json"] == alone  # and batching did not change the image


def test_openai_python_client(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(
        prompt="an orange square in the center",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 3},
    )
    assert len(result.data) == 2 and png_array(result.data[0].model_dump()).shape == (32, 32, 3)
    assert result.data[0].b64_json == server.generate(prompt="an orange square in the center", seed=5)["data"][0]["b64_json"]
    assert [m.id for m in client.models.list()] == ["pipeline"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="an orange square", size="1024x1024")
    assert caught.value.body["param"] == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="an orange square")


def test_bench_command_drives_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "bench",
            "serve",
            "--url",
            server.url,
            "--api-key",
            KEY,
            "--concurrency",
            "4",
            "--requests",
            "8",
            "--steps",
            "2",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(out.read_text())["runs"]["server"]
    assert run["requests"] == 8 and run["ok"] == 8 and run["errors_5xx"] == 0 and run["images"] == 8
    assert 0 < run["latency_p50_s"] <= run["latency_p95_s"] <= run["latency_p99_s"] and run["images_per_s"] > 0
    assert 1 <= run["mean_batch"] <= 4  # one replica, batches of at most 4
    assert "images/s" in result.stdout and "server" in result.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "bench", "serve", "--url", "http://10.1.2.3:8000", "--requests", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "only to this machine" in refused.stderr


def test_models_and_health(server):
    status, models = server.json("GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    base = models["data"][-1]
    assert base["id"] == "pipeline" and base["object"] == "model" and base["size"] == "32x32"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "pipeline" and health["auth"] is True


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 61}, "prompt"),
        ({"prompt": "ok", "n": 4}, "n"),
        ({"prompt": "ok", "n": "two"}, "n"),
        ({"prompt": "ok", "num_inference_steps": 11}, "num_inference_steps"),
        ({"prompt": "ok", "size": "512x512"}, "size"),
        ({"prompt": "ok", "guidance_scale": 0}, "guidance_scale"),
        ({"prompt": "ok", "guidance_scale": [1]}, "guidance_scale"),
        ({"prompt": "ok", "response_format": "url"}, "response_format"),
        ({"prompt": "ok", "model": "gpt-image-1"}, "model"),
        ({"prompt": "ok", "colour": "red"}, "colour"),
        ({"prompt": "ok", "seed": 1.5}, "seed"),
    ],
)
def test_bad_input_is_400_with_the_field_named(server, body, param):
    status, payload = server.json("POST", "/v1/images/generations", body)
    assert status == 400, payload
    assert payload["error"]["param"] == param and param in payload["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"prompt": "ok", "guidance_scale": NaN}'])
def test_malformed_json_is_400(server, raw):
    status, payload, _ = server.request("POST", "/v1/images/generations", raw=raw)
    assert status == 400 and "error" in json.loads(payload)


def test_oversized_body_is_413(server):
    status, payload, _ = server.request("POST", "/v1/images/generations", raw=b'{"prompt": "' + b"x" * 70000 + b'"}')
    assert status == 413 and "the limit is 65536" in json.loads(payload)["error"]["message"]


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
def test_api_needs_the_key(server, headers):
    for method, path, body in [("POST", "/v1/images/generations", {"prompt": "a red circle"}), ("GET", "/v1/models", None)]:
        status, payload, response_headers = server.request(method, path, body, headers=headers)
        assert status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"
        assert response_headers.get("www-authenticate", response_headers.get("WWW-Authenticate")) == "Bearer"
    # The page and the health check stay open: a browser loads the page before it has a key.
    assert server.request("GET", "/", headers=headers)[0] == 200
    assert server.request("GET", "/healthz", headers=headers)[0] == 200


def _wait_for_health(server, predicate, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = server.health()
        if predicate(health):
            return health
        time.sleep(0.3)
    raise TimeoutError(f"server never reached the expected state; last /healthz: {health}")


def test_hot_swap_through_user_config(server, tiny_pipeline_dir, tmp_path):
    from actors.diffusion.files import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME
    from actors.diffusion.generator import adapter_version
    from jobs.serve.app import deploy

    run = tmp_path / "run"
    adapter = make_adapter(tiny_pipeline_dir, run / "checkpoints" / "epoch_0003" / "lora", seed=5)
    (run / "checkpoints" / "epoch_0003" / "COMPLETE").write_text("3\n")
    version = adapter_version(adapter)
    probe = {"prompt": "a purple circle in the center", "seed": 21, "num_inference_steps": 10}
    base_image = server.generate(**probe)["data"][0]["b64_json"]
    replica_started = server.json("GET", "/v1/models")[1]["data"][-1]["created"]

    # Requests in flight while the new adapter loads all complete, each with one set of weights.
    with ThreadPoolExecutor(max_workers=12) as pool:
        in_flight = [pool.submit(server.json, "POST", "/v1/images/generations", {**probe, "seed": 100 + i}) for i in range(12)]
        deploy(server.config, host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), lora=str(run), api_key=KEY)
        answers = [future.result() for future in in_flight]
    assert [status for status, _ in answers] == [200] * 12
    assert {body["adapter_version"] for _, body in answers} <= {None, version}
    _wait_for_health(server, lambda h: h["adapter_version"] == version)
    swapped = server.generate(**probe)
    assert swapped["adapter_version"] == version and swapped["model"] == "pipeline+lora"
    assert swapped["data"][0]["b64_json"] != base_image
    status, models = server.json("GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == ["pipeline+lora", "pipeline"] and models["data"][0]["version"] == version
    assert models["data"][-1]["created"] == replica_started  # reconfigured in place, not restarted
    # The base model stays available by name.
    assert server.generate(**probe, model="pipeline")["data"][0]["b64_json"] == base_image

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / LORA_CONFIG_NAME).write_bytes((adapter / LORA_CONFIG_NAME).read_bytes())
    (corrupt / LORA_WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    for bad, words in [(corrupt, "not a readable safetensors file"), (tmp_path / "missing", "not a LoRA adapter")]:
        deploy(server.config, host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), lora=str(bad), api_key=KEY)
        health = _wait_for_health(server, lambda h, bad=bad: h["adapter_error"] and h["adapter_error"]["lora"] == str(bad))
        assert words in health["adapter_error"]["message"] and health["adapter_version"] == version
        models = server.json("GET", "/v1/models")[1]
        assert models["data"][0]["version"] == version and words in models["adapter_error"]["message"]
        still = server.generate(**probe)
        assert still["adapter_version"] == version and still["data"][0]["b64_json"] == swapped["data"][0]["b64_json"]

    deploy(server.config, host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), lora=None, api_key=KEY)
    _wait_for_health(server, lambda h: h["adapter_version"] is None and h["adapter_error"] is None)
    assert server.generate(**probe)["data"][0]["b64_json"] == base_image


def test_page_shows_generated_images_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # Debian's Chromium (scripts/install-test-tools.sh); Playwright's own browser download is never used.
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: run `bash scripts/install-test-tools.sh` (Debian's chromium package)"
    wait_ms = 60_000
    problems = []  # console errors and uncaught exceptions on the page

    def on_console(message):
        if message.type == "error":
            problems.append(f"console error: {message.text} ({message.location})")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900}, device_scale_factor=1)
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"uncaught exception: {error}"))
            page.goto(server.url + "/", wait_until="load")
            expect(page.locator("#model")).to_have_text(re.compile(r"^model pipeline"), timeout=wait_ms)
            expect(page.locator("#key-label")).to_be_visible(timeout=wait_ms)  # the server wants a key: the page asks for it
            # The form starts from the server's request defaults (the config's default_steps here).
            expect(page.locator("#steps")).to_have_value("3", timeout=wait_ms)
            expect(page.locator("#defaults")).to_have_text(re.compile(r"^defaults: 3 steps"), timeout=wait_ms)
            page.locator("#prompt").fill("a red circle on the left")
            page.locator("#steps").fill("3")
            page.locator("#key").fill(KEY)
            page.locator("#generate").click()
            images = page.locator("#results img")
            expect(images).to_have_count(2, timeout=wait_ms)
            page.wait_for_function(
                "document.querySelectorAll('#results img').length === 2"
                " && [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth === 32)",
                timeout=wait_ms,
            )
            images.first.scroll_into_view_if_needed()
            box = images.first.evaluate("i => { const r = i.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }")
            source = images.first.evaluate("i => i.src")
            shot = page.screenshot(path=tmp_path / "page.png")
        finally:
            browser.close()
    assert problems == [], problems
    screen = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    x, y, width, height = (int(round(v)) for v in box)
    shown = screen[y + 1 : y + height - 1, x + 1 : x + width - 1]  # inside the 1 px border
    background = screen[5, 5]
    assert (np.abs(shown - background).sum(axis=-1) > 30).mean() > 0.5, "the image area looks like the page background"
    # The screenshot shows the very image the API returned: sample the centre of each enlarged pixel.
    generated = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB")).astype(int)
    cell = (height - 2) / 32
    centres = ((np.arange(32) + 0.5) * cell).astype(int)
    assert np.abs(shown[np.ix_(centres, centres)] - generated).mean() < 6
