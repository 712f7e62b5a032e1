"""MMHal-Bench: the judge protocol with a fake judge and with an OpenAI-compatible stub server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("PIL")

from napo.eval.benchmark import DataFormatError, MissingDataError  # noqa: E402
from napo.eval.mmhal import JudgeError, MMHalBench, OpenAIJudge, parse_rating, read_judge_prompt  # noqa: E402

PROMPT = "Contents: {}\nQuestion: {}\nHuman: {}\nModel: {}\n"
TYPES = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("The answer is fine.\nRating: 5, very informative", 5),
        ("rating: 0", 0),
        ("RATING: 6", 6),
        ("no rating given", 0),  # malformed: 0, as the reference
        ("Rating: 2 at first, then Rating: 4", 0),  # two ratings: 0, as the reference
        ("Rating: 7", 0),
    ],
)
def test_rating_parsing(reply, rating):
    assert parse_rating(reply) == rating


@pytest.fixture
def mmhal_dir(tmp_path) -> Path:
    from PIL import Image

    root = tmp_path / "mmhal"
    (root / "images").mkdir(parents=True)
    records = []
    for position in range(10):  # positions 8 and 9 wrap around to types 0 and 1
        name = f"img{position}.jpg"
        Image.new("RGB", (8, 8)).save(root / "images" / name)
        records.append({"question_type": TYPES[position % 8], "question_topic": "t", "image_id": str(position),
                        "image_src": f"https://example.invalid/x/{name}", "image_content": ["Cat", "Sofa"],
                        "question": f"Question {position}?", "gt_answer": f"Human {position}.",
                        "model_answer": ""})  # fmt: skip
    (root / "response_template.json").write_text(json.dumps(records))
    (root / "judge_prompt.txt").write_text(PROMPT)
    return root


class FakeJudge:
    name = "fake"
    is_gpt4 = False

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        answer = prompt.split("Model: ")[1].strip()
        return self.replies[answer]


# Ratings by position: 6, 5, 4, 3, 2, 1, 0, malformed (0), 4, two ratings (0).
REPLIES = {f"Answer {p}.": f"Explanation.\nRating: {r}" for p, r in enumerate([6, 5, 4, 3, 2, 1, 0])}
REPLIES |= {"Answer 7.": "I cannot rate this.", "Answer 8.": "Rating: 4", "Answer 9.": "Rating: 1 or Rating: 2"}


def _answers(bench) -> pd.DataFrame:
    frame = pd.DataFrame(bench.items())
    frame["answer"] = [f"Answer {json.loads(m)['position']}." for m in frame["meta"]]
    return frame


def test_mmhal_scores_by_hand_and_cache(mmhal_dir, tmp_path):
    judge = FakeJudge(REPLIES)
    cache = tmp_path / "judgements.jsonl"
    bench = MMHalBench(mmhal_dir, judge=judge, cache=cache)
    metrics, per_item = bench.score(_answers(bench))
    ratings = [6, 5, 4, 3, 2, 1, 0, 0, 4, 0]
    assert per_item["rating"].tolist() == ratings
    assert metrics["score"] == pytest.approx(sum(ratings) / 10)
    assert metrics["hallucination_rate"] == pytest.approx(5 / 10)  # ratings below 3: 2, 1, 0, 0, 0
    assert metrics["informativeness"] == pytest.approx((3 + 2 + 1 + 0 + 2 + 1 + 0 + 0 + 1 + 0) / 10 / 3)
    assert metrics["type0_attribute"] == pytest.approx((6 + 4) / 2)  # positions 0 and 8
    assert metrics["type1_adversarial"] == pytest.approx((5 + 0) / 2)  # positions 1 and 9
    assert metrics["type7_other"] == 0.0
    # The prompt is the template filled with the contents, question, human answer and model answer.
    assert judge.prompts[3] == "Contents: Cat, Sofa\nQuestion: Question 3?\nHuman: Human 3.\nModel: Answer 3.\n"
    assert len(judge.prompts) == 10
    # A rerun asks nothing again: every judgement comes from the cache file.
    again = MMHalBench(mmhal_dir, judge=judge, cache=cache)
    metrics_again, per_item_again = again.score(_answers(again))
    assert len(judge.prompts) == 10 and per_item_again["cached"].all() and metrics_again == metrics
    # A non-GPT-4 judge is named as such.
    assert any("not GPT-4" in note for note in bench.notes())
    assert "not GPT-4" in bench.headline[0][1]


def test_judge_prompt_read_from_mmhal_script_without_running_it(mmhal_dir):
    (mmhal_dir / "judge_prompt.txt").unlink()
    (mmhal_dir / "eval_gpt4.py").write_text(
        'import sys\nsys.exit("never run")\ntemplate = """A {} B {} C {} D {}"""\n'
        'if __name__ == "__main__":\n    pass\n'
    )
    assert read_judge_prompt(mmhal_dir) == "A {} B {} C {} D {}"
    (mmhal_dir / "eval_gpt4.py").write_text('template = "only {} two {}"\n')
    with pytest.raises(DataFormatError, match="4 \\{\\} slots"):
        read_judge_prompt(mmhal_dir)
    (mmhal_dir / "eval_gpt4.py").unlink()
    with pytest.raises(MissingDataError, match=r"eval_gpt4\.py"):
        read_judge_prompt(mmhal_dir)


class _StubHandler(BaseHTTPRequestHandler):
    requests: ClassVar[list] = []
    reply = "Rating: 4"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = json.dumps({"model": body["model"], "choices": [{"message": {"content": type(self).reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(content.encode())

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def stub_server():
    _StubHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_openai_compatible_judge_against_a_stub_server(mmhal_dir, tmp_path, stub_server, monkeypatch):
    monkeypatch.setenv("NAPO_JUDGE_API_KEY", "test-key")
    judge = OpenAIJudge(base_url=stub_server, model="local-judge", timeout=10)
    assert not judge.is_gpt4
    cache = tmp_path / "judgements.jsonl"
    bench = MMHalBench(mmhal_dir, judge=judge, cache=cache)
    metrics, _ = bench.score(_answers(bench))
    assert metrics["score"] == 4.0 and metrics["hallucination_rate"] == 0.0
    sent = _StubHandler.requests
    assert len(sent) == 10 and {r["path"] for r in sent} == {"/v1/chat/completions"}
    assert sent[0]["auth"] == "Bearer test-key"
    assert sent[0]["body"]["model"] == "local-judge" and sent[0]["body"]["temperature"] == 0.0
    assert sent[0]["body"]["messages"] == [
        {"role": "user", "content": "Contents: Cat, Sofa\nQuestion: Question 0?\nHuman: Human 0.\nModel: Answer 0.\n"}
    ]
    # Cached: a second scoring sends nothing.
    MMHalBench(mmhal_dir, judge=judge, cache=cache).score(_answers(bench))
    assert len(_StubHandler.requests) == 10


def test_an_unreachable_judge_is_one_clear_error(mmhal_dir, stub_server):
    port = int(stub_server.rsplit(":", 1)[1].split("/")[0])
    # Nothing listens on the port above the stub's (almost surely): the connection is refused at once.
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{port + 1}/v1", model="m", timeout=2, retries=0)
    bench = MMHalBench(mmhal_dir, judge=judge)
    with pytest.raises(JudgeError, match="did not answer"):
        bench.score(_answers(bench))


def test_local_hf_judge_rates_through_the_same_protocol(mmhal_dir, tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from napo.data.tiny import build_tokenizer
    from napo.eval.mmhal import HFJudge

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = HFJudge(tmp_path / "judge", device="cpu", max_new_tokens=4)
    assert judge.name == "local judge" and not judge.is_gpt4
    bench = MMHalBench(mmhal_dir, judge=judge, cache=tmp_path / "judgements.jsonl")
    metrics, per_item = bench.score(_answers(bench))
    # Whatever the random tiny model writes is parsed by the protocol's one rule.
    assert all(isinstance(reply, str) for reply in per_item["judge_reply"])
    assert per_item["rating"].tolist() == [parse_rating(r) for r in per_item["judge_reply"]]
    assert metrics["answers"] == 10 and metrics["judge_is_gpt4"] == 0.0
    assert any("local judge" in note and "not GPT-4" not in note for note in bench.notes())
