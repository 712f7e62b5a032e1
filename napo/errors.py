"""Errors more than one room of napo raises and catches."""

from __future__ import annotations

__all__ = ["RowError"]


class RowError(Exception):
    """One input row cannot be processed (an undecodable image, an empty question, ...): the row stages log it in
    their output's errors file, skip the row and go on."""
