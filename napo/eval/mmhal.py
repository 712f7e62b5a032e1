"""MMHal-Bench: 96 questions on OpenImages pictures, each answer rated 0-6 by a judge model.

The judge sees MMHal-Bench's evaluation prompt filled with the image contents (joined by ", "), the
question, the human answer and the model's answer, and replies with an explanation and "Rating: N".
A reply is scored N when exactly one of "rating: 0" ... "rating: 6" occurs in it (case-insensitive),
else 0 (a malformed or ambiguous reply). ``score``: the mean rating; ``hallucination_rate``: the share
of ratings below 3; ``informativeness``: the mean of (rating - 3 if rating >= 3 else rating) / 3;
per question type, the mean rating of the items at positions i with the same i % 8 (the 96 questions
cycle through 8 types). The paper's judge is GPT-4 (gpt-4-0613); any other judge is named in every
report as not GPT-4, its numbers not comparable with published ones.

napo ships no copy of the prompt: it is read from the user's MMHal-Bench download (the ``template``
string of its ``eval_gpt4.py``, read as text, never run) or from a ``judge_prompt.txt`` with four ``{}``
slots. Judgements are cached (``<output>/answers/judgements-mmhal.jsonl``, keyed by judge and prompt), so a
rerun or a second model with the same answer asks nothing twice.

Reference: zhangzef/NaPO ``eval/eval_gpt_mmhal.py`` (prompt filling, parsing, score, hallucination
rate, per-type scores) and ``eval/summarize_gpt_mmhal_review.py`` (informativeness), after
Shengcao1006/MMHal-Bench ``eval_gpt4.py``. napo's implementation is its own.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from napo.eval.benchmark import (
    Benchmark,
    DataFormatError,
    Decoding,
    MissingDataError,
    item,
    metas,
    read_json,
    require_keys,
    require_types,
)

__all__ = ["HFJudge", "Judge", "JudgeError", "MMHalBench", "OpenAIJudge", "parse_rating", "read_judge_prompt"]

RECORD_KEYS = ("question_type", "image_content", "question", "gt_answer", "image_src")
TYPES = 8


class JudgeError(OSError):
    """The judge could not be asked (unreachable server, bad reply): nothing is scored."""


class Judge(Protocol):
    """Anything that rates: ``name`` (recorded in the reports and the cache key) and ``__call__(prompt) ->
    reply text``. ``is_gpt4``: whether it is the paper's judge."""

    name: str
    is_gpt4: bool

    def __call__(self, prompt: str) -> str: ...


def parse_rating(reply: str) -> int:
    """The rating of a judge's reply: N if exactly one "rating: N" (N in 0..6) occurs, case-insensitively; else 0."""
    text = reply.lower()
    found = [n for n in range(7) if f"rating: {n}" in text]
    return found[0] if len(found) == 1 else 0


def read_judge_prompt(data_dir: Path) -> str:
    """The evaluation prompt: ``judge_prompt.txt`` or the ``template`` assignment of ``eval_gpt4.py`` (parsed
    with ``ast``; the file is not executed). It must have four ``{}`` slots."""
    text_file, script = data_dir / "judge_prompt.txt", data_dir / "eval_gpt4.py"
    if text_file.is_file():
        template = text_file.read_text(encoding="utf-8")
    elif script.is_file():
        template = None
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "template" for t in node.targets)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                template = node.value.value
        if template is None:
            raise DataFormatError(f"mmhal: {script} has no string assignment to `template` (the judge's prompt)")
    else:
        raise MissingDataError(
            "mmhal", [str(script)], hint="the judge's prompt: eval_gpt4.py of MMHal-Bench, or judge_prompt.txt"
        )
    if template.count("{}") != 4:
        raise DataFormatError(f"mmhal: the judge prompt must have 4 {{}} slots, has {template.count('{}')}")
    return template


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, or a local ``vllm serve``).

    ``base_url`` / ``model`` / ``api_key`` default to the environment: ``NAPO_JUDGE_BASE_URL`` (else
    https://api.openai.com/v1), ``NAPO_JUDGE_MODEL`` (else gpt-4-0613) and ``NAPO_JUDGE_API_KEY`` (else
    ``OPENAI_API_KEY``). Temperature 0, as the reference. A failed request is retried ``retries`` times.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
    ) -> None:
        self.base_url = (base_url or os.environ.get("NAPO_JUDGE_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.model = model or os.environ.get("NAPO_JUDGE_MODEL") or "gpt-4-0613"
        self.api_key = api_key or os.environ.get("NAPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout, self.retries = timeout, retries
        self.name = f"{self.model} via {self.base_url}"
        self.is_gpt4 = self.model.startswith("gpt-4")

    def __call__(self, prompt: str) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps(
            {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        last: Exception | None = None
        for _ in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                return reply["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as error:
                last = error
                if error.code in (400, 401, 403, 404):
                    break  # the request itself is wrong: asking again cannot help
            except (urllib.error.URLError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as error:
                last = error
        raise JudgeError(f"the judge at {self.base_url} (model {self.model}) did not answer: {last}")


class HFJudge:
    """A local HuggingFace causal LM as the judge (greedy, its chat template): text only, not GPT-4."""

    def __init__(self, model: str | Path, device: str = "auto", max_new_tokens: int = 512) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from napo.models.loading import resolve_device

        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.model = AutoModelForCausalLM.from_pretrained(str(model)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.name = f"local {Path(str(model)).name}"
        self.is_gpt4 = False
        self._torch = torch

    def __call__(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class JudgementCache:
    """Judge replies on disk, one JSON line each, keyed by the judge's name and the prompt."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.replies: dict[str, str] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError):
                    continue  # a line cut short by a crash: asked again

    @staticmethod
    def key(judge_name: str, prompt: str) -> str:
        return hashlib.sha256(f"{judge_name}\0{prompt}".encode()).hexdigest()

    def ask(self, judge: Judge, prompt: str) -> tuple[str, bool]:
        """(reply, whether it came from the cache)."""
        key = self.key(judge.name, prompt)
        if key in self.replies:
            return self.replies[key], True
        reply = judge(prompt)
        self.replies[key] = reply
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"key": key, "judge": judge.name, "reply": reply}) + "\n")
        return reply, False


class MMHalBench(Benchmark):
    """MMHal-Bench from ``<data_dir>/response_template.json`` (the 96 records), the images under
    ``<data_dir>/images/`` (named as the end of each record's image_src) and the judge prompt (see
    :func:`read_judge_prompt`). ``judge``: a :class:`Judge` (default :class:`OpenAIJudge` from the
    environment); ``cache``: the judgements file (set by :func:`napo.eval.evaluate` beside the answers)."""

    name = "mmhal"
    title = "MMHal-Bench"
    # The instance's labels also name a judge that is not GPT-4 (see __init__).
    headline = (("score", "MMHal score", True), ("hallucination_rate", "MMHal HalRate", False))

    def __init__(self, data_dir: str | Path, judge: Judge | None = None, cache: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        # zhangzef/NaPO muffin/eval/muffin_vqa.py with its defaults: 3 beams, 1024 new tokens, sampling at
        # temperature 0.2 (do_sample is on whenever the temperature is above 0).
        self.decoding = Decoding(max_new_tokens=1024, num_beams=3, temperature=0.2)
        records_path = self.data_dir / "response_template.json"
        if not records_path.is_file():
            raise MissingDataError(self.name, [str(records_path)], hint="download MMHal-Bench (see the README)")
        self.template = read_judge_prompt(self.data_dir)
        self.records = read_json(records_path, self.name)
        if not isinstance(self.records, list):
            raise DataFormatError(f"{self.name}: {records_path} must hold a JSON list")
        for number, record in enumerate(self.records):
            require_keys(record, RECORD_KEYS, f"{records_path} record {number}", self.name)
            kinds = {"question_type": "string", "image_content": "strings", "question": "text", "gt_answer": "string",
                     "image_src": "text"}  # fmt: skip
            require_types(record, kinds, f"{records_path} record {number}", self.name)
        missing = [str(self._image(r)) for r in self.records if not self._image(r).is_file()]
        if missing:
            raise MissingDataError(self.name, missing, hint="put MMHal-Bench's images under images/")
        self.judge = judge if judge is not None else OpenAIJudge()
        self.cache_path = Path(cache) if cache is not None else None
        label = "MMHal score" if self.judge.is_gpt4 else f"MMHal score (judge {self.judge.name}, not GPT-4)"
        self.headline = (("score", label, True), ("hallucination_rate", "MMHal HalRate", False))

    def _image(self, record: dict) -> Path:
        return self.data_dir / "images" / str(record["image_src"]).rstrip("/").split("/")[-1]

    def notes(self) -> list[str]:
        notes = [f"Judge: {self.judge.name}."]
        if not self.judge.is_gpt4:
            notes.append(
                "This judge is not GPT-4 (the paper's judge): the scores are not comparable with published "
                "MMHal-Bench numbers."
            )
        return notes

    def items(self) -> list[dict]:
        return [
            item(f"{position:03d}", str(self._image(r).relative_to(self.data_dir)), r["question"], position=position)
            for position, r in enumerate(self.records)
        ]

    def prompt(self, record: dict, answer: str) -> str:
        return self.template.format(", ".join(record["image_content"]), record["question"], record["gt_answer"], answer)

    def score(self, answers):
        import pandas as pd

        cache = JudgementCache(self.cache_path)
        rows = []
        for idx, meta, answer in zip(answers["idx"], metas(answers), answers["answer"], strict=True):
            record = self.records[meta["position"]]
            reply, cached = cache.ask(self.judge, self.prompt(record, answer or ""))
            rating = parse_rating(reply)
            rows.append(
                {
                    "idx": idx,
                    "position": meta["position"],
                    "question_type": record["question_type"],
                    "rating": rating,
                    "hallucination": int(rating < 3),
                    "cached": cached,
                    "judge_reply": reply,
                    "answer": answer,
                }
            )
        frame = pd.DataFrame(
            rows,
            columns=["idx", "position", "question_type", "rating", "hallucination", "cached", "judge_reply", "answer"],
        )
        ratings = frame["rating"].tolist()
        n = len(ratings)
        metrics = {
            "score": sum(ratings) / n if n else 0.0,
            "hallucination_rate": sum(r < 3 for r in ratings) / n if n else 0.0,
            "informativeness": sum((r - 3 if r >= 3 else r) for r in ratings) / n / 3 if n else 0.0,
            "answers": n,
            "judge_is_gpt4": float(self.judge.is_gpt4),
        }
        for kind in range(TYPES):
            chosen = frame[frame["position"] % TYPES == kind]
            first = next((r["question_type"] for i, r in enumerate(self.records) if i % TYPES == kind), str(kind))
            metrics[f"type{kind}_{first}"] = float(chosen["rating"].mean()) if len(chosen) else float("nan")
        return metrics, frame
