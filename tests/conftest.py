"""Shared fixtures: tiny *real* diffusers pipelines saved to disk, seeded."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests run where CUDA is; elsewhere they are reported as skipped, never silently dropped."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: a parameter id "gpu" is a keyword too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server on loopback (moto), with the usual AWS variables pointing at it for the session.

    Set before any Ray cluster of the session starts, so its workers inherit them as a node's credentials.
    """
    from jobs.bench.s3 import S3Server

    with S3Server() as server:
        saved = {name: os.environ.get(name) for name in server.env}
        os.environ.update(server.env)
        yield server
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """Where a test writes: a local directory, or a prefix of its own in the test S3 server."""
    from actors.storage import Location
    from jobs.bench.s3 import BUCKET

    if request.param == "local":
        return Location(tmp_path / "store")
    request.getfixturevalue("s3")  # the server, and the AWS variables pointing at it
    return Location(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised SD-1.5-format pipeline directory (a few hundred kB)."""
    from actors.toy.model import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0, tiny=True)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A randomly initialised SD3-format pipeline directory (about 450 kB)."""
    from actors.toy.sd3 import build_random_sd3_pipeline

    return build_random_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A randomly initialised FLUX.1-dev-format pipeline directory (about 380 kB)."""
    from actors.toy.flux import build_random_flux_pipeline

    return build_random_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipeline", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the module: the tiny transformers are faster so, and runs are reproducible."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_reward_models(tmp_path_factory):
    """Tiny random reward checkpoints in their published layouts, converted and ready (seconds)."""
    from tests.helpers.tiny_rewards import build_tiny_reward_models

    return build_tiny_reward_models(tmp_path_factory.mktemp("tiny-rewards"))


@pytest.fixture(scope="session")
def scoring_server():
    """A real local HTTP scoring service (mean brightness) for the ``http`` reward."""
    from tests.helpers.scoring_server import ScoringServer

    with ScoringServer() as server:
        yield server


@pytest.fixture(scope="session")
def reward_options(tiny_reward_models, scoring_server):
    """Options that make every configured reward runnable here, by reward name."""
    return {**tiny_reward_models.options(), "http": {"url": scoring_server.url, "timeout_s": 10, "batch_size": 3}}


@pytest.fixture(scope="session")
def family_pipeline_dirs(tiny_pipeline_dir, tmp_path_factory):
    """Tiny random pipelines of every supported family, saved to disk, by variant name."""
    from actors.toy.model import build_random_pipeline

    root = tmp_path_factory.mktemp("tiny-families")
    return {
        "sd15": tiny_pipeline_dir,
        "sd2-v": build_random_pipeline(root / "sd2-v", seed=1, variant="sd2-v"),
        "sdxl": build_random_pipeline(root / "sdxl", seed=2, variant="sdxl"),
    }
