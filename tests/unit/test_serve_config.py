"""The server's config: validation that names the field, and how it maps onto Ray Serve."""

import pytest

from jobs.serve.app import (
    application_config,
    config_from_args,
    deployment_options,
    model_id,
    page_html,
)
from orchestrator.config import ServeConfig, load_config


@pytest.mark.parametrize(
    "data, words",
    [
        ({"eta": 0}, "eta must be > 0 and <= 1, got 0"),
        ({"limits": {"max_n": 0}}, "limits.max_n must be >= 1, got 0"),
        ({"limits": {"default_steps": 80}}, "limits.default_steps must be >= 1 and <= 50, got 80"),
        ({"limits": {"max_guidance_scale": 0.5}}, "limits.max_guidance_scale must be >= 1.0, got 0.5"),
        ({"limits": {"default_guidance_scale": 30.0}}, "limits.default_guidance_scale must be >= 1.0 and <= 20.0"),
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size must be >= 1, got 0"),
        ({"batching": {"batch_wait_timeout_s": -1}}, "batching.batch_wait_timeout_s must be >= 0"),
        ({"batching": {"max_batch_size": 128}}, "scaling.max_ongoing_requests must be >= batching.max_batch_size (128), got 64"),
        ({"scaling": {"min_replicas": 3, "max_replicas": 2}}, "scaling.max_replicas must be >= 3, got 2"),
        ({"scaling": {"num_replicas": 0}}, "scaling.num_replicas must be >= 1, got 0"),
        ({"device": "tpu"}, "device must be one of 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"lora": " runs/r1"}, "lora must be null or a non-empty string without surrounding spaces"),
        ({"batching": {"max_batch": 8}}, "unknown config key 'batching.max_batch' (did you mean 'max_batch_size'?)"),
    ],
)
def test_bad_values_name_the_field(data, words):
    with pytest.raises(ValueError) as caught:
        load_config(data, cls=ServeConfig)
    assert words in str(caught.value)


def test_fixed_replicas_map_to_serve_options():
    options = deployment_options(
        load_config(
            {"lora": "runs/r1", "scaling": {"num_replicas": 3, "num_cpus_per_replica": 2, "max_ongoing_requests": 40}}, cls=ServeConfig
        )
    )
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert options["max_ongoing_requests"] == 40 and options["user_config"] == {"lora": "runs/r1"}


def test_autoscaling_bounds_map_to_serve_options():
    cfg = load_config({"scaling": {"autoscale": True, "min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 8}}, cls=ServeConfig)
    options = deployment_options(cfg)
    assert options["num_replicas"] == "auto"
    assert options["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 8.0}


def test_serve_run_args_are_yaml_strings_with_dotted_keys():
    cfg = config_from_args({"lora": "runs/r1", "batching.max_batch_size": "8", "eta": "0.5", "limits": {"max_n": 2}})
    assert (cfg.lora, cfg.batching.max_batch_size, cfg.eta, cfg.limits.max_n) == ("runs/r1", 8, 0.5, 2)
    with pytest.raises(ValueError, match="batching.max_batch_size must be >= 1"):
        config_from_args({"batching.max_batch_size": "0"})


def test_adapter_lives_only_in_user_config_so_a_swap_keeps_the_code_version():
    cfg = load_config({"lora": "runs/r1"}, cls=ServeConfig)
    first, second = application_config(cfg, lora="runs/r1/a"), application_config(cfg, lora="runs/r2/b")
    assert first["args"] == second["args"] and first["args"]["lora"] is None
    assert first["import_path"] == "jobs.serve:app" and second["deployments"] == [
        {"name": "ImageServer", "user_config": {"lora": "runs/r2/b"}}
    ]
    assert "runtime_env" not in first
    assert application_config(cfg, lora=None, api_key="k")["runtime_env"] == {"env_vars": {"RAYALIGN_API_KEY": "k"}}


def test_model_ids():
    assert model_id(ServeConfig()) == "toy-t2i"
    assert model_id(ServeConfig(model="/models/sd-1.5/")) == "sd-1.5"
    assert model_id(ServeConfig(model="/models/sd-1.5", model_name="house-style")) == "house-style"


def test_the_web_page_ships_with_the_package():
    page = page_html()
    assert "<title>rayalign</title>" in page and "/v1/images/generations" in page
