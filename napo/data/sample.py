"""The embedded sample set: a deterministic RLAIF-V-schema Parquet with real encoded images.

Each row shows one drawn shape in one colour. The question asks about the image; the chosen
answer is what the image shows, the rejected answer follows a language prior (the most common
colour or shape, whatever the picture), which is exactly the modality bias NaPO targets.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

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
COLUMNS = ("ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path")


def draw_image(shape: str, color: str, rng: random.Random, size: int = 64):
    """A PIL image of one shape on a light background, at a random position and scale."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size // 2)
    x0, y0 = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return image


def draw_scene(shapes: list[tuple[str, str]], rng: random.Random, size: int = 64):
    """Up to 4 (shape, colour) pairs, each drawn as :func:`draw_image` draws one, in its own cell of a 2 x 2 grid."""
    from PIL import Image

    if not 1 <= len(shapes) <= 4:
        raise ValueError(f"a scene holds 1 to 4 shapes, got {len(shapes)}")
    half = size // 2
    canvas = Image.new("RGB", (size, size), (245, 245, 245))
    cells = rng.sample([(0, 0), (half, 0), (0, half), (half, half)], len(shapes))
    for (shape, color), cell in zip(shapes, cells, strict=True):
        canvas.paste(draw_image(shape, color, rng, size=half), cell)
    return canvas


def sample_rows(rows: int = 32, seed: int = 0) -> list[dict]:
    """The sample rows as dicts (image as {"bytes", "path"}), deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        image = draw_image(shape, color, rng)
        image_format = "PNG" if index % 2 == 0 else "JPEG"
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        if rng.random() < 0.5:
            question = f"What color is the {shape} in the image?"
            chosen = f"The {shape} in the image is {color}."
            wrong = PRIOR_COLOR if color != PRIOR_COLOR else "blue"
            rejected = f"The {shape} is {wrong}, as {shape}s usually are."
        else:
            question = "What shape is drawn in this picture?"
            chosen = f"The picture shows a {color} {shape}."
            wrong = PRIOR_SHAPE if shape != PRIOR_SHAPE else "square"
            rejected = f"It is a {wrong}, the most common shape in pictures."
        path = f"sample/{index:05d}.{image_format.lower().replace('jpeg', 'jpg')}"
        out.append(
            {
                "ds_name": "napo-sample",
                "image": {"bytes": buffer.getvalue(), "path": path},
                "question": question,
                "chosen": chosen,
                "rejected": rejected,
                "origin_dataset": "napo/shapes",
                "origin_split": "train",
                "idx": index,
                "image_path": path,
            }
        )
    return out


def make_sample_data(path: str | Path, rows: int = 32, seed: int = 0) -> Path:
    """Writes the sample set as one Parquet file (RLAIF-V columns) and returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(sample_rows(rows, seed))
    pq.write_table(table.select(list(COLUMNS)), path)
    return path


def sample_corpus() -> list[str]:
    """Every question and answer text of the sample set's grammar: what the tiny tokenizer is trained on."""
    texts = ["What shape is drawn in this picture?", "Describe the image.", "USER:", "ASSISTANT:"]
    for shape in SHAPES:
        for color in COLORS:
            texts += [
                f"What color is the {shape} in the image?",
                f"The {shape} in the image is {color}.",
                f"The {shape} is {color}, as {shape}s usually are.",
                f"The picture shows a {color} {shape}.",
                f"It is a {shape}, the most common shape in pictures.",
            ]
    return texts
