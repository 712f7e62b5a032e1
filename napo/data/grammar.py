"""The grammar of napo's drawn world: its colours and shapes, the language prior ("a shape is red"), and how
an answer names them. The sample set, the pretrained tiny LLaVA's world and the ``shapes`` benchmark all speak
it; the benchmark reads it from here, so the world never depends on its own exam."""

from __future__ import annotations

import re

__all__ = ["COLORS", "PRIOR_COLOR", "PRIOR_SHAPE", "SHAPES", "SHAPE_WORDS", "article", "first_color", "shape_mentions"]

# Each colour's name and how it is drawn (RGB).
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
PRIOR_COLOR, PRIOR_SHAPE = "red", "circle"  # what a text-only model would guess

# Shape words an answer may use: the drawn ones and others a model may invent (each a hallucination).
SHAPE_WORDS = ("circle", "square", "triangle", "rectangle", "oval", "star", "diamond", "hexagon", "pentagon", "heart")


def article(word: str) -> str:
    """ "an" before a vowel, else "a": "an orange circle", "a red square"."""
    return "an" if word[0] in "aeiou" else "a"


def shape_mentions(text: str) -> list[str]:
    """Every shape word of ``text`` in order (singular; "squares" -> "square"), one per mention."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    return [word.removesuffix("s") for word in words if word.removesuffix("s") in SHAPE_WORDS]


def first_color(text: str) -> str | None:
    """The first colour word of ``text``, or None when it names none."""
    for word in re.findall(r"[a-z]+", (text or "").lower()):
        if word in COLORS:
            return word
    return None
