"""Log configuration: one line per event, to stderr (Heroku and Render collect it)."""
from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    """Configure the ``app`` logger once per process; ``LOG_LEVEL`` (default INFO) sets the level."""
    logger = logging.getLogger("app")
    if getattr(logger, "_kallglot_bridge_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel((level or os.environ.get("LOG_LEVEL") or "INFO").upper())
    logger.propagate = False
    logger._kallglot_bridge_configured = True  # type: ignore[attr-defined]
