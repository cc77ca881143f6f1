"""Serving the aligned policy with Ray Serve: the application, its HTTP API and its web page.

``jobs.serve:app`` is the application's import path (``serve run jobs.serve:app``, KubeRay's
``serveConfigV2``). It is resolved on first use, so importing :mod:`jobs.serve.api` alone does
not load Ray Serve.
"""


def __getattr__(name: str):
    if name == "app":
        # lazy: Ray Serve and FastAPI load only when the application is wanted
        from jobs.serve.app import app

        return app
    raise AttributeError(f"module 'jobs.serve' has no attribute {name!r}")
