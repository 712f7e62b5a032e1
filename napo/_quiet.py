"""Quiet by default: napo's commands print napo's own lines, progress bars and tables, not the libraries'
progress bars and known-harmless warnings. ``--verbose`` or ``NAPO_VERBOSE=1`` shows everything.

Only the bars and the warnings listed here, each with why it is harmless, are hidden: errors, and the
warnings a user must act on, always show.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

VERBOSE_VARIABLE = "NAPO_VERBOSE"
VERBOSE_HELP = "also show the libraries' progress bars and warnings (or set NAPO_VERBOSE=1)"

# Read at import by huggingface_hub (transformers' "Loading weights" and "Writing model shards" bars follow
# it) and by datasets ("Generating train split"); set before the import they also reach the processes a
# command starts. A value the user set wins.
_PROGRESS_BAR_VARIABLES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")

_HARMLESS_WARNINGS = (
    # TRL's configs give `gradient_checkpointing` a default value and transformers 5 renamed the field
    # `activation_checkpointing`, so every NaPOConfig warns, whatever the user passes (napo sets neither;
    # the new name does not exist in the transformers 4 that napo also supports).
    (FutureWarning, r"`gradient_checkpointing(_kwargs)?` is deprecated"),
)

# DeepSpeed (which accelerate imports when it is installed) announces that a machine without a GPU computes
# on the CPU; napo's own "training on N process(es) (device)" line already says where training runs.
_HARMLESS_LOG_MESSAGES = {"DeepSpeed": ("Setting accelerator to CPU",)}


def verbose_requested(flag: bool = False) -> bool:
    """True for ``--verbose`` or a NAPO_VERBOSE other than empty, 0, false, no or off."""
    return flag or os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in {"", "0", "false", "no", "off"}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def configure(verbose: bool = False) -> bool:
    """Hides the libraries' noise unless verbose (the flag or NAPO_VERBOSE); returns whether output is verbose.
    Called once at the start of a command."""
    if verbose_requested(verbose):
        return True
    for variable in _PROGRESS_BAR_VARIABLES:
        os.environ.setdefault(variable, "1")
    # A library imported already read its variable too late: tell it directly.
    hub_bars_off, dataset_bars_off = (os.environ[variable] == "1" for variable in _PROGRESS_BAR_VARIABLES)
    for module, function, off in (
        ("huggingface_hub", "utils.disable_progress_bars", hub_bars_off),
        ("transformers", "utils.logging.disable_progress_bar", hub_bars_off),
        ("datasets", "utils.disable_progress_bars", dataset_bars_off),
    ):
        if off and module in sys.modules:
            path, name = f"{module}.{function}".rsplit(".", 1)
            getattr(importlib.import_module(path), name)()
    for category, message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in _HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # the library's own logger, created here if it is not imported yet
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    return False
