"""What every command does to its console: quiet library progress bars."""

from __future__ import annotations

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging


def quiet_library_progress() -> None:
    """Loading a few small files should not print "Loading weights" bars."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
