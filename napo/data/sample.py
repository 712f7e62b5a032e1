"""The embedded sample set: a deterministic RLAIF-V-schema Parquet with real encoded images.

Each row shows one drawn shape in one colour. The question asks about the image; the chosen
answer is what the image shows, the rejected answer follows a language prior (the most common
colour or shape, whatever the picture), which is exactly the modality bias NaPO targets.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from napo.data.grammar import COLORS, PRIOR_COLOR, PRIOR_SHAPE, SHAPES, article

COLUMNS = ("ds_name", "image", "question", "chosen", "rejected", "origin_dataset", "origin_split", "idx", "image_path")


def draw_image(shape: str, color: str, rng: random.Random, size: int = 64):
    """A PIL image of one shape on a light background, at a random position and scale."""
    return _draw_placed(shape, color, rng, size)[0]


def _draw_placed(shape: str, color: str, rng: random.Random, size: int = 64):
    """:func:`draw_image`'s picture and where in it the shape is ("top left corner", "middle", ...)."""
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
    return image, region((x0 + extent / 2) / size, (y0 + extent / 2) / size)


def region(x: float, y: float) -> str:
    """The words for where a point is in a picture (``x``, ``y`` in [0, 1] from the top left): thirds."""
    row, column = min(int(y * 3), 2), min(int(x * 3), 2)
    names = (
        ("top left corner", "top centre", "top right corner"),
        ("left side", "middle", "right side"),
        ("bottom left corner", "bottom centre", "bottom right corner"),
    )
    return names[row][column]


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


WRITERS = ("world", "other")
"""Who wrote the sample set's answers. ``world``: the sample world's own register, the one the pretrained tiny LLaVA
(:mod:`napo.data.world`) speaks ("The square in the image is red."), so its language-biased answer to a red shape *is*
the chosen answer. ``other``: another writer, as RLAIF-V's answers come from other models than the one trained: short
("Red.", "It's red.") or longer sentences naming the shape and where it is ("The square in the top left corner is
red."), registers the pretrained model never produces; the chosen and rejected answers of a row share one phrasing and
differ in content only."""

# The other writer's phrasings: {c} colour, {C} capitalised colour, {s} shape, {S} capitalised shape, {a} the
# colour's article, {an} the shape's article, {where} the shape's place (:func:`region`).
OTHER_COLOR_ANSWERS = (
    "{C}.",
    "It's {c}.",
    "It is {c}.",
    "The {s} is {c}.",
    "The {s} in the {where} is {c}.",
    "I see {a} {c} {s} in the {where} of the picture.",
)
OTHER_SHAPE_ANSWERS = (
    "{S}.",
    "It's {an} {s}.",
    "{A} {c} {s}.",
    "{A} {c} {s} in the {where}.",
    "I see {a} {c} {s} in the {where} of the picture.",
)
OTHER_ABSENT_ANSWERS = ("There's no {s}.", "There is no {s} here.", "I see no {s} in the picture.")
"""The other writer's answer to a colour question about a shape the picture does not have (blank, or another shape)."""


def _other(template: str, shape: str, color: str, where: str) -> str:
    a = article(color)
    return template.format(c=color, C=color.capitalize(), s=shape, S=shape.capitalize(), a=a, A=a.capitalize(),
                           an=article(shape), where=where)  # fmt: skip


def sample_rows(
    rows: int = 32, seed: int = 0, writer: str = "world", absent_share: float = 0.0, with_truth: bool = False
) -> list[dict]:
    """The sample rows as dicts (image as {"bytes", "path"}), deterministic for a seed.

    ``writer``: who wrote chosen and rejected (:data:`WRITERS`). ``absent_share``: the share of rows whose colour
    question asks about a shape the picture does not have (half on a blank picture, half on a picture of another
    shape); the chosen answer says there is none, the rejected one names the prior colour. With ``with_truth`` each
    row also has ``truth``: {"kind": "color" | "shape" | "absent", "shape": the shape asked about or drawn,
    "color": the drawn colour (None on a blank picture)}. The defaults draw the same rows as before these options."""
    from PIL import Image

    if writer not in WRITERS:
        raise ValueError(f"writer must be one of {', '.join(WRITERS)}, got {writer!r}")
    if not 0.0 <= absent_share <= 1.0:
        raise ValueError(f"absent_share must be in [0, 1], got {absent_share}")
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        image, where = _draw_placed(shape, color, rng)
        absent = absent_share > 0 and rng.random() < absent_share
        if absent:  # asked about another shape than the drawn one, or about one on a blank picture
            asked = rng.choice([s for s in SHAPES if s != shape])
            if rng.random() < 0.5:
                image, color = Image.new("RGB", image.size, (255, 255, 255)), None
            question = f"What color is the {asked} in the image?"
            if writer == "world":
                chosen = f"There is no {asked} in the image."
                rejected = f"The {asked} is {PRIOR_COLOR}, as {asked}s usually are."
            else:
                chosen = _other(rng.choice(OTHER_ABSENT_ANSWERS), asked, PRIOR_COLOR, where)
                rejected = _other(rng.choice(OTHER_COLOR_ANSWERS[:4]), asked, PRIOR_COLOR, where)
            truth = {"kind": "absent", "shape": asked, "color": color}
        elif rng.random() < 0.5:
            question = f"What color is the {shape} in the image?"
            wrong = PRIOR_COLOR if color != PRIOR_COLOR else "blue"
            if writer == "world":
                chosen = f"The {shape} in the image is {color}."
                rejected = f"The {shape} is {wrong}, as {shape}s usually are."
            else:
                template = rng.choice(OTHER_COLOR_ANSWERS)
                chosen, rejected = _other(template, shape, color, where), _other(template, shape, wrong, where)
            truth = {"kind": "color", "shape": shape, "color": color}
        else:
            question = "What shape is drawn in this picture?"
            wrong = PRIOR_SHAPE if shape != PRIOR_SHAPE else "square"
            if writer == "world":
                chosen = f"The picture shows {article(color)} {color} {shape}."
                rejected = f"It is a {wrong}, the most common shape in pictures."
            else:
                template = rng.choice(OTHER_SHAPE_ANSWERS)
                chosen, rejected = _other(template, shape, color, where), _other(template, wrong, color, where)
            truth = {"kind": "shape", "shape": shape, "color": color}
        image_format = "PNG" if index % 2 == 0 else "JPEG"
        buffer = io.BytesIO()
        image.save(buffer, format=image_format)
        path = f"sample/{index:05d}.{image_format.lower().replace('jpeg', 'jpg')}"
        row = {
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
        if with_truth:
            row["truth"] = truth
        out.append(row)
    return out


def make_sample_data(
    path: str | Path, rows: int = 32, seed: int = 0, writer: str = "world", absent_share: float = 0.0
) -> Path:
    """Writes the sample set as one Parquet file (RLAIF-V columns) and returns its path (see :func:`sample_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(sample_rows(rows, seed, writer=writer, absent_share=absent_share))
    pq.write_table(table.select(list(COLUMNS)), path)
    return path


def sample_corpus() -> list[str]:
    """Every question and answer text of the sample set's grammar, both writers' and the world's (absent shapes
    included): what the tiny tokenizer is trained on."""
    texts = ["What shape is drawn in this picture?", "Describe the image.", "USER:", "ASSISTANT:"]
    places = [region(x / 3 + 0.1, y / 3 + 0.1) for y in range(3) for x in range(3)]
    for shape in SHAPES:
        texts += [
            f"There is no {shape} in the image.",
            *(_other(t, shape, PRIOR_COLOR, "") for t in OTHER_ABSENT_ANSWERS),
        ]
        for color in COLORS:
            texts += [
                f"What color is the {shape} in the image?",
                f"The {shape} in the image is {color}.",
                f"The {shape} is {color}, as {shape}s usually are.",
                f"The picture shows {article(color)} {color} {shape}.",
                f"It is a {shape}, the most common shape in pictures.",
            ]
            for template in OTHER_COLOR_ANSWERS + OTHER_SHAPE_ANSWERS:
                texts += [_other(template, shape, color, where) for where in places]
    return texts
