"""Console logging of posttrain's own messages (resume notices, skipped rows, warnings)."""

from __future__ import annotations

import logging
import sys

LOGGER = "posttrain"


def enable_console_logging(level: int = logging.INFO) -> None:
    """Print `posttrain.*` log records at `level` and above to stderr as `posttrain: message`.

    Does nothing when the application (or pytest) already configured a handler on the root or
    the `posttrain` logger, so an embedding program keeps control of its logs.
    """
    logger = logging.getLogger(LOGGER)
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("posttrain: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
