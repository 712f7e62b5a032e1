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


# What configure() changed in this process, so that a later verbose command in the same process (a notebook,
# a test calling napo.cli.main twice) gets everything back: variables it set, libraries whose bars it turned
# off, warnings filters it added.
_applied: dict[str, list] = {"variables": [], "bars": [], "warnings": []}

_BAR_SWITCHES = (  # (module, function that turns its bars off, function that turns them on, variable it follows)
    ("huggingface_hub", "utils.disable_progress_bars", "utils.enable_progress_bars", _PROGRESS_BAR_VARIABLES[0]),
    ("transformers", "utils.logging.disable_progress_bar", "utils.logging.enable_progress_bar",
     _PROGRESS_BAR_VARIABLES[0]),
    ("datasets", "utils.disable_progress_bars", "utils.enable_progress_bars", _PROGRESS_BAR_VARIABLES[1]),
)  # fmt: skip


def _call(module: str, function: str) -> None:
    path, name = f"{module}.{function}".rsplit(".", 1)
    getattr(importlib.import_module(path), name)()


def _restore() -> None:
    """Undoes what an earlier quiet configure() did in this process."""
    for variable in _applied["variables"]:
        os.environ.pop(variable, None)
    for module, _, enable, _ in _BAR_SWITCHES:
        if module in _applied["bars"]:
            _call(module, enable)
    for entry in _applied["warnings"]:
        if entry in warnings.filters:
            warnings.filters.remove(entry)
    mutated = getattr(warnings, "_filters_mutated", None)  # the warnings module's cache of filter decisions
    if mutated is not None:
        mutated()
    for name in _HARMLESS_LOG_MESSAGES:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, _DropMessages)]
    for changes in _applied.values():
        changes.clear()


def configure(verbose: bool = False) -> bool:
    """Hides the libraries' noise unless verbose (the flag or NAPO_VERBOSE); returns whether output is verbose.
    Called once at the start of a command; a verbose call undoes what an earlier quiet one did."""
    if verbose_requested(verbose):
        _restore()
        return True
    for variable in _PROGRESS_BAR_VARIABLES:
        if variable not in os.environ:
            os.environ[variable] = "1"
            _applied["variables"].append(variable)
    # A library imported already read its variable too late: tell it directly.
    for module, disable, _, variable in _BAR_SWITCHES:
        if os.environ[variable] == "1" and module in sys.modules:
            _call(module, disable)
            if module not in _applied["bars"]:
                _applied["bars"].append(module)
    for category, message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
        if warnings.filters[0] not in _applied["warnings"]:
            _applied["warnings"].append(warnings.filters[0])
    for name, prefixes in _HARMLESS_LOG_MESSAGES.items():
        logger = logging.getLogger(name)  # the library's own logger, created here if it is not imported yet
        if not any(isinstance(existing, _DropMessages) for existing in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    return False
