"""Third-party console messages known to be harmless in this project, filtered so that what a
user must read is not lost among them. Each entry says why it is harmless."""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["HARMLESS_LOG_LINES", "HARMLESS_WARNINGS", "quiet_third_party"]

#: warning messages (regular expressions) dropped
HARMLESS_WARNINGS = (
    # torch deprecates a pytree check Lightning's own code still makes; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # only the summary's size estimate assumes 32 bits; training runs at the configured precision
    r"Precision .* is not supported by the model summary",
    # model=timm with frozen layers: their batch norms are kept in eval mode on purpose, so that a
    # frozen layer keeps its running statistics too (melanoma.models.timm_backbone.TimmBackbone.train)
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
#: Lightning info lines dropped (substrings)
HARMLESS_LOG_LINES = (
    "litlogger",  # an advertisement for a cloud logger
    "Trainer already configured with model summary callbacks",  # ours is configured on purpose
)
RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in HARMLESS_LOG_LINES)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    for name in (RANK_ZERO_LOGGER, "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())


def is_filtered(message: str) -> bool:
    """Whether a warning message would be dropped (for tests)."""
    return any(re.search(p, message) for p in HARMLESS_WARNINGS)
