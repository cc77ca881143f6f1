"""Shared fixtures: tiny *real* diffusers pipelines saved to disk, seeded."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A randomly initialised SD-1.5-format pipeline directory (a few hundred kB)."""
    from actors.toy_model import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0, tiny=True)
