"""The Ray Serve application behind ``rayalign serve``: one deployment, an HTTP ingress.

``ImageServer`` replicas each hold an :class:`~actors.diffusion.generator.ImageGenerator`;
requests from many clients are batched by ``@serve.batch``; the LoRA adapter is
hot-swapped through the deployment's ``user_config`` (``{"lora": PATH}``), which Ray
Serve hands to ``reconfigure`` without restarting the replica.

Importable as a Serve application, for ``serve run jobs.serve:app lora=RUN_DIR`` or a
KubeRay ``serveConfigV2``::

    applications:
      - name: rayalign
        import_path: jobs.serve:app
        route_prefix: /
        args: {model: /models/sd15, batching: {max_batch_size: 8}}   # a ServeConfig
        deployments:
          - name: ImageServer
            user_config: {lora: /runs/r1}    # edit this to hot-swap the adapter

``rayalign serve`` deploys exactly that through the same declarative path (:func:`deploy`),
because only a declarative deploy keeps the code version when ``user_config`` changes,
so that a swap is a ``reconfigure`` and not a restart of every replica.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.
import asyncio
import dataclasses
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from actors.diffusion.generator import ImageGenerator, ImageJob
from actors.diffusion.images import encode_png
from actors.toy.model import resolve_model_path
from jobs.sampling import ChosenSampling, choose_sampling
from jobs.serve import api as serve_api
from orchestrator.config import ServeConfig, load_config, replace, to_dict
from orchestrator.pools import threads_for
from orchestrator.rundir import SamplerSettings, resolve_lora_dir, resolve_model, trained_model, trained_sampling

logger = logging.getLogger(__name__)

APP_NAME = "rayalign"
DEPLOYMENT_NAME = "ImageServer"
IMPORT_PATH = "jobs.serve:app"
USER_CONFIG_KEYS = ("lora",)

api = FastAPI(title="rayalign", docs_url=None, redoc_url=None, openapi_url=None)


def model_id(config: ServeConfig) -> str:
    """Id of the base model: ``model_name``, else the model directory's name."""
    if config.model_name:
        return config.model_name
    return Path(resolve_model_path(config.model)).resolve().name


def adapter_id(config: ServeConfig) -> str:
    return f"{model_id(config)}+lora"


SAMPLING_FIELDS = {"num_steps": "limits.default_steps", "eta": "eta", "guidance_scale": "limits.default_guidance_scale"}
"""Where the server config sets each sampler default (null: the served adapter's training setting)."""


def serve_sampling(config: ServeConfig, adapter_dir: str | os.PathLike | None) -> ChosenSampling:
    """The sampler defaults for requests while ``adapter_dir`` (None: the base model) is served.

    A setting the config gives wins; otherwise the adapter's training setting; otherwise the
    built-in default. Raises ``ValueError`` when the result is outside the request limits.
    """
    given = {"num_steps": config.limits.default_steps, "eta": config.eta, "guidance_scale": config.limits.default_guidance_scale}
    chosen = choose_sampling(given, trained_sampling(Path(adapter_dir)) if adapter_dir else None, names=SAMPLING_FIELDS)
    settings, limits = chosen.settings, config.limits
    where = f" (trained with it: {chosen.trained_from})" if chosen.trained_from else ""
    if settings.num_steps > limits.max_steps:
        raise ValueError(
            f"the default of {settings.num_steps} steps{where} is above limits.max_steps {limits.max_steps}; "
            "raise limits.max_steps or set limits.default_steps"
        )
    if settings.guidance_scale > limits.max_guidance_scale:
        raise ValueError(
            f"the default guidance {settings.guidance_scale:g}{where} is above limits.max_guidance_scale "
            f"{limits.max_guidance_scale:g}; raise limits.max_guidance_scale or set limits.default_guidance_scale"
        )
    if not 0 < settings.eta <= 1:
        raise ValueError(f"eta {settings.eta:g}{where} is outside (0, 1]; set eta in the serve config")
    return chosen


def request_window(settings: SamplerSettings, num_steps: int) -> tuple[int, int] | None:
    """The SDE window a request for ``num_steps`` steps is sampled with: the served adapter's
    training window at its trained number of steps (the window names steps of that schedule),
    else none (the SDE on every step)."""
    return settings.sde_window if num_steps == settings.num_steps else None


def request_defaults(chosen: ChosenSampling) -> dict[str, Any]:
    """The sampler defaults as request fields, for ``/healthz``, ``/v1/models`` and the page."""
    settings = chosen.settings
    return {
        "num_inference_steps": settings.num_steps,
        "guidance_scale": settings.guidance_scale,
        "eta": settings.eta,
        "sde_window": list(settings.sde_window) if settings.sde_window else None,
        "sources": {
            "num_inference_steps": chosen.sources["num_steps"],
            "guidance_scale": chosen.sources["guidance_scale"],
            "eta": chosen.sources["eta"],
        },
        "trained_from": str(chosen.trained_from) if chosen.trained_from else None,
    }


def page_html() -> str:
    """The web page at ``/`` (shipped as package data)."""
    return resources.files("jobs.serve").joinpath("static", "index.html").read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class _Queued:
    """One request waiting for a batch; ``cost`` is the batch room it takes."""

    job: Any
    cost: int


def _batch_cost(items: list[_Queued]) -> int:
    return sum(item.cost for item in items)


def _error_response(error: serve_api.RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# Helpers the replica uses are defined above the class: Serve ships the ingress class by
# value, with the module globals that exist when the class is defined.
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class ImageServer:
    """One replica: the model, the batch queue, the served adapter and the HTTP routes."""

    def __init__(self, config: dict[str, Any]):

        self.config = load_config(config, cls=ServeConfig)
        torch.set_num_threads(threads_for(self.config.scaling.num_cpus_per_replica))
        batching = self.config.batching
        base, unet = resolve_model(self.config.model)  # a fully fine-tuned run: its base model and trained UNet
        self.generator = ImageGenerator.from_pretrained(
            base,
            unet_path=unet.uri if unet is not None else None,
            device=self.config.device,
            dtype=self.config.dtype,
            batch_size=batching.max_batch_size,
            pad_batches=batching.pad_to_max_batch_size,
        )
        self._generate_batch.set_max_batch_size(batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.api_key = os.environ.get(serve_api.API_KEY_ENV) or None
        self.sizes = [serve_api.size_text(*self.generator.image_size)]
        self.page = page_html()
        self.created = int(time.time())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.adapter_error: dict[str, Any] | None = None
        self.sampling = serve_sampling(self.config, None)
        self._configured = False

    # ------------------------------------------------------------------ hot swap
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve the adapter ``user_config["lora"]`` names (null: the base model).

        On a replica already serving, a bad adapter is reported (``/v1/models``,
        ``/healthz``, the log) and the weights served so far stay. On a starting
        replica it is an error: a replica never serves weights it was not asked for.
        """

        try:
            unknown = sorted(set(user_config or {}) - set(USER_CONFIG_KEYS))
            if unknown:
                raise ValueError(f"unknown user_config key {unknown[0]!r}; accepted keys: {', '.join(USER_CONFIG_KEYS)}")
            lora = (user_config or {}).get("lora")
            adapter_dir = None if lora is None else resolve_lora_dir(lora)
            sampling = serve_sampling(self.config, adapter_dir)  # before the swap: a refused adapter changes nothing
            if adapter_dir is None:
                await asyncio.to_thread(self.generator.unload_adapter)
            else:
                await asyncio.to_thread(self.generator.load_adapter, adapter_dir)
            self.sampling = sampling
            for line in sampling.differences:
                logger.warning("serving %s: %s", adapter_dir, line)
            self.adapter_error = None
        except ValueError as error:
            if not self._configured:
                raise
            logger.error("hot swap to %s failed; still serving %s: %s", user_config, self._served_version(), error)
            self.adapter_error = {"lora": (user_config or {}).get("lora"), "message": str(error), "at": int(time.time())}
        self._configured = True

    def _served_version(self) -> str:
        adapter = self.generator.adapter
        return adapter.version if adapter else "the base model"

    # ------------------------------------------------------------------ batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=_batch_cost)
    async def _generate_batch(self, items: list[_Queued]) -> list[Any]:
        # The denoiser blocks for the whole batch; a worker thread keeps the replica's
        # event loop free to accept the requests that will form the next batch.
        return await asyncio.to_thread(self._generate_pngs, [item.job for item in items])

    def _generate_pngs(self, jobs: list[Any]) -> list[tuple[list[bytes], str | None]]:
        results = self.generator.generate(jobs)
        return [([encode_png(image) for image in result.images], result.adapter_version) for result in results]

    # ------------------------------------------------------------------ routes
    def _models(self) -> list[str]:
        base = model_id(self.config)
        return [adapter_id(self.config), base] if self.generator.adapter else [base]

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        adapter = self.generator.adapter
        return JSONResponse(
            {
                "status": "ok",
                "replica": self.replica,
                "model": model_id(self.config),
                "adapter_version": adapter.version if adapter else None,
                "adapter_error": self.adapter_error,
                "sampling": request_defaults(self.sampling),
                "auth": self.api_key is not None,
                "stats": dict(self.generator.stats),
            }
        )

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            serve_api.check_api_key(request.headers.get("authorization"), self.api_key)
        except serve_api.RequestError as error:
            return _error_response(error)
        height, width = self.generator.image_size
        base = {
            "id": model_id(self.config),
            "object": "model",
            "created": self.created,
            "owned_by": "rayalign",
            "size": serve_api.size_text(height, width),
            "sampling": request_defaults(self.sampling),
        }
        data = [base]
        adapter = self.generator.adapter
        if adapter:
            data.insert(
                0,
                {
                    "id": adapter_id(self.config),
                    "object": "model",
                    "created": int(adapter.loaded_at),
                    "owned_by": "rayalign",
                    "parent": base["id"],
                    "root": base["id"],
                    "version": adapter.version,
                    "lora_rank": adapter.rank,
                    "size": base["size"],
                    "sampling": base["sampling"],
                },
            )
        return JSONResponse({"object": "list", "data": data, "adapter_error": self.adapter_error})

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:

        limits = self.config.limits
        try:
            serve_api.check_api_key(request.headers.get("authorization"), self.api_key)
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
                raise serve_api.RequestError(f"request body is {declared} bytes; the limit is {limits.max_body_bytes}", status=413)
            body = await request.body()
            sampling = self.sampling.settings  # one read: a swap during this request does not mix settings
            parsed = serve_api.parse_generation_request(body, limits=limits, defaults=sampling, sizes=self.sizes, models=self._models())
        except serve_api.RequestError as error:
            return _error_response(error)
        job = ImageJob(
            prompt=parsed.prompt,
            seeds=serve_api.image_seeds(parsed.seed, parsed.n),
            num_steps=parsed.num_inference_steps,
            guidance_scale=parsed.guidance_scale,
            eta=sampling.eta,
            use_adapter=parsed.model != model_id(self.config),
            sde_window=request_window(sampling, parsed.num_inference_steps),
        )
        try:
            pngs, version = await self._generate_batch(_Queued(job=job, cost=min(parsed.n, self.config.batching.max_batch_size)))
        except Exception:
            logger.exception("generation failed for a valid request")
            return JSONResponse(
                {
                    "error": {
                        "message": "the server failed to generate the images; see the server log",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status_code=500,
            )
        model = adapter_id(self.config) if version else model_id(self.config)
        return JSONResponse(
            serve_api.generation_response(
                created=int(time.time()),
                model=model,
                adapter_version=version,
                request=parsed,
                eta=sampling.eta,
                pngs=pngs,
                sde_window=job.sde_window,
            )
        )


# --------------------------------------------------------------------------- the application


def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """``Deployment.options`` for a config: replicas or autoscaling bounds, resources, the adapter."""
    scaling = config.scaling
    options: dict[str, Any] = {
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": scaling.num_cpus_per_replica, "num_gpus": scaling.num_gpus_per_replica},
        "user_config": {"lora": config.lora},
        # Loading a model takes a while on a busy machine; the default 30 s is too tight.
        "health_check_timeout_s": 60,
    }
    if scaling.autoscale:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(1, scaling.min_replicas),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = scaling.num_replicas
    return options


def with_trained_model(config: ServeConfig) -> ServeConfig:
    """``config`` with ``model`` set to the model its adapter was trained on, when it names none."""
    if config.model is not None or config.lora is None:
        return config
    model = trained_model(resolve_lora_dir(config.lora))
    return config if model is None else replace(config, model=model)


def build_app(config: ServeConfig):
    """The Serve application for ``config`` (``serve.run(build_app(cfg))`` works too, though a
    ``user_config`` change then restarts replicas instead of reconfiguring them). Without a
    ``model``, the adapter's base model is served."""
    config = with_trained_model(config)
    return ImageServer.options(**deployment_options(config)).bind(to_dict(config))


def config_from_args(args: dict[str, Any]) -> ServeConfig:
    """A :class:`~orchestrator.config.ServeConfig` from application ``args``.

    Nested mappings (a Serve config file) are taken as they are; string values, which is
    all ``serve run`` passes, are read as YAML and their dotted keys reach nested fields,
    so ``serve run jobs.serve:app lora=runs/r1 batching.max_batch_size=8`` works.
    """
    plain = {key: value for key, value in args.items() if not isinstance(value, str)}
    overrides = [f"{key}={value}" for key, value in args.items() if isinstance(value, str)]
    return load_config(plain, overrides, cls=ServeConfig)


def app(args: dict[str, Any]):
    """Application builder for ``serve run jobs.serve:app KEY=VALUE ...`` and Serve config files."""
    return build_app(config_from_args(args))


# --------------------------------------------------------------------------- deploying


def application_config(config: ServeConfig, *, lora: str | None, api_key: str | None = None) -> dict[str, Any]:
    """The application entry of a Serve config (what ``serveConfigV2`` holds) for ``config``.

    The adapter goes in the deployment's ``user_config`` and nowhere else: changing it
    then leaves the application's code version alone, and Ray Serve reconfigures the
    running replicas instead of replacing them.
    """
    entry: dict[str, Any] = {
        "name": APP_NAME,
        "import_path": IMPORT_PATH,
        "route_prefix": "/",
        "args": to_dict(replace(config, lora=None)),
        "deployments": [{"name": DEPLOYMENT_NAME, "user_config": {"lora": lora}}],
    }
    if api_key:
        entry["runtime_env"] = {"env_vars": {serve_api.API_KEY_ENV: api_key}}
    return entry


def deploy(
    config: ServeConfig,
    *,
    host: str,
    port: int,
    lora: str | None,
    api_key: str | None = None,
    timeout_s: float = 300,
    on_wait: Callable[[str], None] | None = None,
) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (if not running) and deploy or update the application.

    Blocks until the application runs. Raises ``ValueError`` with Serve's own message
    when it fails to deploy (a replica that cannot load the model or adapter, say).
    """

    serve.start(http_options={"host": host, "port": port})
    schema = ServeDeploySchema.model_validate(
        {
            "http_options": {"host": host, "port": port},
            "applications": [application_config(config, lora=lora, api_key=api_key)],
        }
    )
    _get_global_client().deploy_apps(schema)
    wait_until_running(timeout_s=timeout_s, on_wait=on_wait)


def wait_until_running(*, timeout_s: float, on_wait: Callable[[str], None] | None = None) -> None:
    """Wait for the application to be RUNNING; ``on_wait`` gets a status line now and then."""
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = str(getattr(getattr(status, "status", None), "value", "NOT_STARTED"))
        if state == "RUNNING" and _deployment_settled(status):
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ValueError(f"the Serve application failed to start ({state}): {_failure_message(status)}")
        if time.monotonic() > deadline:
            raise ValueError(
                f"the Serve application did not start within {timeout_s:.0f} s (status {state}); "
                "see the Ray logs under /tmp/ray/session_latest/logs/serve"
            )
        if on_wait is not None and time.monotonic() - last_report > 10:
            on_wait(f"waiting for {DEPLOYMENT_NAME} replicas to load the model (status {state})")
            last_report = time.monotonic()
        time.sleep(0.5)


def _deployment_settled(status) -> bool:
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    return deployment is not None and deployment.status == "HEALTHY"


def _failure_message(status) -> str:
    messages = [status.message] + [d.message for d in status.deployments.values()]
    text = "\n".join(m for m in messages if m).strip()
    # Serve includes the replica's whole traceback; the last line is the error itself.
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line]
    return (errors[-1] if errors else lines[-1] if lines else "no message").strip()
