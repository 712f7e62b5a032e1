"""Benchmark: napo eval's answer generation, batched vs one item at a time, and its metric computation.

Generation: the built-in shapes benchmark's items on the tiny LLaVA (built offline), greedy, the
same settings at every batch size; batch size 1 is the reference scripts' one-item-at-a-time loop.
Items per second, median of repeats (min-max). Metrics: the time to score 1,000 answers per
benchmark (shapes, VLind pipeline, POPE, Object HalBench CHAIR and AMBER with stub NLP, so that the
numbers measure napo's code, not NLTK's or spaCy's), median of repeats. Rows appended to
benchmarks/results/eval.csv.

Run: python benchmarks/bench_eval.py [--scenarios 8] [--max-new-tokens 16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_csv import append_rows, default_path


def _generation(args, work: Path) -> dict:
    from napo.data import load_model, make_tiny_model
    from napo.eval.answers import generate_benchmark_answers
    from napo.eval.benchmark import Decoding
    from napo.eval.shapes import ShapesBench

    model_dir = make_tiny_model(work / "tiny")
    loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
    bench = ShapesBench(scenarios=args.scenarios)
    decoding = Decoding(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    results = {}
    for batch_size in args.batch_sizes:
        rates = []
        for repeat in range(args.repeats):
            summary = generate_benchmark_answers(
                bench, model_dir, work / f"out-{batch_size}-{repeat}", loaded=loaded, decoding=decoding,
                batch_size=batch_size, progress=False,
            )  # fmt: skip
            rates.append(summary.rows_per_second)
        results[batch_size] = (statistics.median(rates), min(rates), max(rates))
    return results


def _answers_for(bench, answer_of):
    import pandas as pd

    frame = pd.DataFrame(bench.items())
    frame["answer"] = [answer_of(json.loads(meta)) for meta in frame["meta"]]
    return frame


def _metric_inputs(work: Path) -> dict:
    """{benchmark: (benchmark object, 1,000 answers)}, from synthetic files of each benchmark's layout."""
    from PIL import Image

    from napo.eval.amber import AmberBench
    from napo.eval.nlp import TextTools
    from napo.eval.objhal import ObjectHalBench
    from napo.eval.pope import PopeBench
    from napo.eval.shapes import ShapesBench

    rng = random.Random(0)
    words = ["dog", "cat", "chair", "table", "person", "car", "tree", "grass", "sky", "cup", "the", "a", "on", "with"]
    tools = TextTools(
        tokenize=lambda text: re.findall(r"[a-z]+|[^\sa-z]", text),
        lemmatize=lambda word: word.removesuffix("s"),
        pos_tag=lambda tokens: [(t, "NN" if t in words[:10] else "DT") for t in tokens],
    )
    sentence = lambda: " ".join(rng.choice(words) for _ in range(40)) + "."  # noqa: E731
    image = work / "x.jpg"
    Image.new("RGB", (8, 8)).save(image)
    inputs = {}
    shapes = ShapesBench(scenarios=77)  # 1,001 items
    inputs["shapes"] = (shapes, _answers_for(shapes, lambda meta: rng.choice(["True.", "False", "a red circle"])))

    pope = work / "pope"
    (pope / "images").mkdir(parents=True)
    (pope / "images" / "x.jpg").write_bytes(image.read_bytes())
    labels = [rng.choice(["yes", "no"]) for _ in range(1000)]
    lines = [json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": label})
             for i, label in enumerate(labels)]  # fmt: skip
    (pope / "coco_pope_random.json").write_text("\n".join(lines))
    bench = PopeBench(pope)
    inputs["pope"] = (bench, _answers_for(bench, lambda meta: rng.choice(["Yes, there is.", "No."])))

    objhal = work / "objhal"
    (objhal / "annotations").mkdir(parents=True)
    (objhal / "synonyms.txt").write_text("\n".join(f"{w}, {w}s" for w in words[:10]) + "\n")
    categories = [{"id": i, "name": w} for i, w in enumerate(words[:10])]
    for split in ("train", "val"):
        anns = [{"image_id": i, "category_id": rng.randrange(10)} for i in range(200) for _ in range(3)]
        (objhal / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"categories": categories, "annotations": anns})
        )
        caps = [{"image_id": i, "caption": sentence()} for i in range(200) for _ in range(5)]
        (objhal / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"annotations": caps}))
    rows = [{"image_id": i % 200, "question": "Describe.", "image_path": "x.jpg"} for i in range(1000)]
    (objhal / "x.jpg").write_bytes(image.read_bytes())
    (objhal / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bench = ObjectHalBench(objhal, tools=tools)
    inputs["objhal"] = (bench, _answers_for(bench, lambda meta: sentence()))

    amber = work / "amber"
    (amber / "data" / "query").mkdir(parents=True)
    (amber / "image").mkdir()
    relation = {w: [] for w in words[:10]}
    annotations = [{"id": i + 1, "type": "generative", "truth": rng.sample(words[:10], 4),
                    "hallu": rng.sample(words[:10], 3)} for i in range(1000)]  # fmt: skip
    (amber / "data" / "annotations.json").write_text(json.dumps(annotations))
    (amber / "data" / "relation.json").write_text(json.dumps(relation))
    (amber / "data" / "safe_words.txt").write_text("sky\n")
    starts = ["chair_score", "chair_num", "safe_cover_score", "safe_cover_num", "hallu_cover_score",
              "hallu_cover_num", "non_hallu_score", "non_hallu_num"]  # fmt: skip
    (amber / "data" / "metrics.txt").write_text("\n".join(f"{k}={0.001 if k.endswith('num') else 0}" for k in starts))
    queries = [{"id": i + 1, "image": "x.jpg", "query": "Describe this image."} for i in range(1000)]
    (amber / "data" / "query" / "query_generative.json").write_text(json.dumps(queries))
    (amber / "image" / "x.jpg").write_bytes(image.read_bytes())
    bench = AmberBench(amber, tools=tools, similarity=lambda a, b: 1.0 if a == b else 0.0)
    inputs["amber"] = (bench, _answers_for(bench, lambda meta: sentence()))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=8, help="shapes scenarios (13 items each)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--csv", type=Path, default=default_path("eval"))
    args = parser.parse_args()

    import napo

    work = Path(tempfile.mkdtemp(prefix="napo-bench-eval-"))
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU {platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    )  # fmt: skip
    header = ["benchmark", "device", "napo", "torch", "variant", "size", "value", "min", "max", "unit"]
    rows = []
    if not args.skip_generation:
        results = _generation(args, work)
        base = results[args.batch_sizes[0]][0]
        print(f"napo eval generation, shapes ({args.scenarios * 13} items), tiny LLaVA, max_new_tokens="
              f"{args.max_new_tokens}, num_beams={args.num_beams}, {device}, torch {torch.__version__}\n")  # fmt: skip
        print("| batch size | items/s (min-max) | speed-up vs batch 1 |")
        print("|---:|---:|---:|")
        for batch_size, (median, low, high) in results.items():
            print(f"| {batch_size} | {median:.2f} ({low:.2f}-{high:.2f}) | {median / base:.2f}x |")
            rows.append(["eval-generate", device, napo.__version__, torch.__version__, "shapes", batch_size,
                         f"{median:.2f}", f"{low:.2f}", f"{high:.2f}", "items/s"])  # fmt: skip
    print("\n| benchmark | answers | scoring s (min-max) |")
    print("|---|---:|---:|")
    for name, (bench, answers) in _metric_inputs(work).items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            bench.score(answers)
            times.append(time.perf_counter() - start)
            if name == "objhal":
                bench._truth = None  # each repeat also reads and maps the COCO files
        median = statistics.median(times)
        print(f"| {name} | {len(answers)} | {median:.3f} ({min(times):.3f}-{max(times):.3f}) |")
        rows.append(["eval-metrics", device, napo.__version__, torch.__version__, name, len(answers),
                     f"{median:.4f}", f"{min(times):.4f}", f"{max(times):.4f}", "s"])  # fmt: skip
    append_rows(args.csv, header, rows)


if __name__ == "__main__":
    main()
