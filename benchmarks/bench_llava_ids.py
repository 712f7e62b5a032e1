"""Benchmark: what LLaVA's own token ids cost in napo's ``llava_v1`` path against the plain fast tokenizer.

napo encodes ``llava_v1`` text with a copy of the fast tokenizer whose whitespace-only merges rank last (as
sentencepiece's scores say; napo.data.prompts.sentencepiece_backend). Measured: building that copy (once per
tokenizer), and encoding answers with it against ``tokenizer(answers)`` (what the path did before), on the
Mistral-7B v0.1 sentencepiece model that mistral-common ships (a LLaMA-family tokenizer, 32000 pieces).

Run: python benchmarks/bench_llava_ids.py [--answers 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import mistral_common
    from transformers import LlamaTokenizer

    from napo.data import prompts

    model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    text = "The red circle is left of the blue square,  and there are 12 cats.\nIt is 10:45 a.m. 🙂"
    words = text.split()
    answers = [" " + " ".join(words[(i + k) % len(words)] for k in range(40 + i % 80)) for i in range(args.answers)]
    tokens = sum(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])

    start = time.perf_counter()
    prompts.sentencepiece_backend(tokenizer)
    build = time.perf_counter() - start

    def timed(run) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    plain = timed(lambda: tokenizer(answers, add_special_tokens=False))
    napo = timed(lambda: prompts.text_ids(tokenizer, answers, dummy_prefix=False))
    print(f"{args.answers} answers, {tokens} tokens, {os.cpu_count()} CPU threads\n")
    print("| step | ms | vs fast tokenizer |")
    print("|---|---|---|")
    print(f"| fast tokenizer (before: merges whitespace runs unlike sentencepiece) | {1e3 * plain:.1f} | 1.00 |")
    print(f"| napo text_ids (sentencepiece's merges) | {1e3 * napo:.1f} | {napo / plain:.2f} |")
    print(f"| building the corrected copy, once per tokenizer | {1e3 * build:.1f} | |")


if __name__ == "__main__":
    main()
