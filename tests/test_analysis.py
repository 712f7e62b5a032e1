"""napo.analysis on inputs with answers known by hand, figures rendered to PNG headless, and
`napo analyze` end to end on the tiny model."""

from __future__ import annotations

import io
import json
import math
import re

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from napo.analysis import (  # noqa: E402
    margins,
    markdown_table,
    noise_ranking,
    plot_margin_hist,
    plot_q_curve,
    plot_training_curves,
    q_at,
    read_noise_labels,
    summarize,
)

PNG = b"\x89PNG\r\n\x1a\n"


def cached_rows() -> pd.DataFrame:
    """Three rows whose reference log-probs give round margins and token counts.

    chosen: -10 over 5 tokens; rejected: -12 over 4; question_only: -4, -20, -10 over 2, 10, 5 tokens;
    image_only: -30 over 6."""
    return pd.DataFrame({
        "idx": [7, 8, 9],
        "ref_chosen_logps": [-10.0, -10.0, -10.0], "ref_chosen_avg_logps": [-2.0, -2.0, -2.0],
        "ref_rejected_logps": [-12.0] * 3, "ref_rejected_avg_logps": [-3.0] * 3,
        "ref_question_only_logps": [-4.0, -20.0, -10.0], "ref_question_only_avg_logps": [-2.0, -2.0, -2.0],
        "ref_image_only_logps": [-30.0] * 3, "ref_image_only_avg_logps": [-5.0] * 3,
        "question_only": ["a", "b", "c"], "image_only": ["d", "e", "f"], "rejected": ["g", "h", "i"],
        "is_noisy": [True, False, False],
    })  # fmt: skip


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_margins_from_cached_columns_by_hand():
    table = margins(cached_rows())
    assert list(dict.fromkeys(table["term"])) == ["original", "language", "vision"]
    language = table[table["term"] == "language"].set_index("idx")
    assert language["logp_margin"].tolist() == [-6.0, 10.0, 0.0]  # -10 - (-4), -10 - (-20), -10 - (-10)
    assert language["avg_logp_margin"].tolist() == [0.0, 0.0, 0.0]
    assert language["length_margin"].tolist() == [3.0, -5.0, 0.0]  # 5 - 2, 5 - 10, 5 - 5 tokens
    assert language["q"].tolist() == [1.0, 1.0, 1.0]  # avg margin 0 -> q = 1 (gamma 0.5, avg kind)
    vision = table[table["term"] == "vision"]
    assert vision["logp_margin"].tolist() == [20.0] * 3 and vision["length_margin"].tolist() == [-1.0] * 3
    assert vision["q"].iloc[0] == pytest.approx(2 * (1 - sigmoid(0.01 * 20.0)))
    original = table[table["term"] == "original"]
    assert original["avg_logp_margin"].tolist() == [1.0] * 3 and original["length_margin"].tolist() == [1.0] * 3


def test_q_at_known_means():
    assert q_at(0.0, 0.5) == 1.0
    assert q_at(-50.0, 0.5) == 1.0  # negative margins clip to 1
    assert q_at(math.log(3) / 0.5, 0.5) == pytest.approx(0.5)  # sigmoid(ln 3) = 3/4
    assert q_at(1e4, 1.0) == 0.001  # clipped at q_min
    assert q_at(1e4, 1.0, q_min=0.05) == 0.05


def test_noise_labels_from_a_column_a_mapping_and_files(tmp_path):
    data = cached_rows()
    from_column = margins(data, noise_labels="is_noisy")
    assert from_column.groupby("idx")["noise"].first().to_dict() == {7: "noisy", 8: "clean", 9: "clean"}
    assert read_noise_labels({7: "Noisy", 8: 0, 9: "clean"}) == {7: "noisy", 8: "clean", 9: "clean"}
    pd.DataFrame({"idx": [7, 8, 9], "label": ["clean", "noisy", "clean"]}).to_csv(tmp_path / "l.csv", index=False)
    assert read_noise_labels(tmp_path / "l.csv") == {7: "clean", 8: "noisy", 9: "clean"}
    (tmp_path / "l.json").write_text(json.dumps({"7": True, "8": False, "9": False}))
    assert set(read_noise_labels(tmp_path / "l.json").values()) == {"noisy", "clean"}
    per_term = margins(data, noise_labels={"language": "is_noisy", "vision": {7: 0, 8: 0, 9: 1}})
    assert per_term.query("term == 'vision' and idx == 9")["noise"].item() == "noisy"
    assert per_term.query("term == 'original'")["noise"].isna().all()  # no labels were given for it
    with pytest.raises(ValueError, match="noisy/clean"):
        read_noise_labels({7: "maybe"})
    with pytest.raises(ValueError, match="no noise label for idx"):
        margins(data, noise_labels={7: True})


def test_noise_ranking_puts_the_lowest_margin_first_with_napos_weight():
    data = pd.DataFrame({
        "idx": [1, 2, 3, 4],
        "ref_chosen_logps": [0.0] * 4, "ref_chosen_avg_logps": [-1.0] * 4,
        "ref_image_only_logps": [-5.0, 3.0, -1.0, 10.0], "ref_image_only_avg_logps": [-1.0] * 4,
        "image_only": ["a"] * 4,
    })  # fmt: skip
    table = margins(data)  # vision margins: 5, -3, 1, -10
    ranked = noise_ranking(table, "vision", top=None, beta=0.1)
    assert ranked["idx"].tolist() == [4, 2, 3, 1] and ranked["rank"].tolist() == [1, 2, 3, 4]
    q = 2 * (1 - sigmoid(0.01 * (5 - 3 + 1 - 10) / 4))  # Eq. 12 at the mean margin -1.75 -> clipped to 1
    assert min(q, 1.0) == 1.0
    expected = [sigmoid(0.1 * m) ** 1.0 for m in (-10, -3, 1, 5)]
    assert ranked["napo_weight"].tolist() == pytest.approx(expected)
    assert noise_ranking(table, "vision", top=2)["idx"].tolist() == [4, 2]
    with pytest.raises(ValueError, match="no rows for term 'language'"):
        noise_ranking(table, "language")


def test_summarize_by_hand():
    summary = summarize(margins(cached_rows(), noise_labels="is_noisy"))
    language_clean = summary.query("term == 'language' and noise == 'clean'").iloc[0]
    assert language_clean["rows"] == 2 and language_clean["mean logp margin"] == 5.0  # (10 + 0) / 2
    assert language_clean["share negative"] == 0.0 and language_clean["q at mean"] == 1.0
    language_noisy = summary.query("term == 'language' and noise == 'noisy'").iloc[0]
    assert language_noisy["share negative"] == 1.0 and language_noisy["mean length margin"] == 3.0
    assert "| term | noise | rows |" in markdown_table(summary)


def test_missing_reference_columns_without_a_model():
    partial = margins(cached_rows().drop(columns=["ref_image_only_logps"]))
    assert set(partial["term"]) == {"original", "language"}  # the term without cached columns is left out
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        margins(cached_rows().drop(columns=["ref_chosen_logps"]))


def test_q_column_follows_each_terms_configuration():
    from napo import TermConfig

    table = margins(cached_rows(), terms={"original": TermConfig(loss="dpo"), "vision": TermConfig(q=0.3)})
    assert (table.query("term == 'original'")["q"] == 0.0).all()
    assert (table.query("term == 'vision'")["q"] == 0.3).all()


def test_labels_from_a_series_and_unlabelled_terms_in_the_summary():
    data = cached_rows()
    series = pd.Series([True, False, False], index=data["idx"])
    assert read_noise_labels(series) == {7: "noisy", 8: "clean", 9: "clean"}
    summary = summarize(margins(data, noise_labels={"language": series}))
    assert set(summary["term"]) == {"original", "language", "vision"}  # terms without labels are kept
    assert summary.query("term == 'vision'")["noise"].isna().all()


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_figures_render_to_png_headless(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    table = margins(cached_rows(), noise_labels="is_noisy")
    diverged = table.copy()
    diverged.loc[0, "logp_margin"] = float("nan")
    diverged.loc[1, "logp_margin"] = float("inf")
    assert "2 non-finite left out" in plot_margin_hist(diverged, kind="logp_margin").axes[0].get_title()
    for figure in (plot_margin_hist(table), plot_margin_hist(margins(cached_rows()), kind="length_margin"),
                   plot_q_curve(table), plot_q_curve()):  # fmt: skip
        data = png_bytes(figure)
        assert data.startswith(PNG) and len(data) > 5000
    history = [{"step": s, "loss": 1.0 / s, "napo/q_language": 1.0 - 0.1 * s, "napo/weight_language": 0.5,
                "napo/margin_language": 0.2 * s, "napo/q_vision": 1.0, "napo/weight_vision": 0.5,
                "napo/margin_vision": 0.1 * s} for s in range(1, 6)]  # fmt: skip
    state = tmp_path / "run" / "checkpoint-5" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"log_history": history}))
    for source in (history, state, tmp_path / "run"):
        figure = plot_training_curves(source)
        assert [line.get_label() for line in figure.axes[0].lines] == ["language", "vision"]
        assert list(figure.axes[0].lines[0].get_ydata()) == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
        assert png_bytes(figure).startswith(PNG)
    with pytest.raises(ValueError, match="no napo"):
        plot_training_curves([{"step": 1, "loss": 0.5}])


# ---------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    pytest.importorskip("transformers")
    from napo.data import generate_biased, make_sample_data, make_tiny_model

    root = tmp_path_factory.mktemp("analysis")
    make_tiny_model(root / "model")
    make_sample_data(root / "sample.parquet", rows=6, seed=4)
    generate_biased(root / "model", root / "sample.parquet", root / "biased", max_new_tokens=8, num_beams=1,
                    progress=False)  # fmt: skip
    return root


def test_scoring_the_reference_as_the_policy_gives_zero_reward_margins(biased, tmp_path):
    from napo.train.reference import compute_reference_logps

    compute_reference_logps(biased / "model", biased / "biased", tmp_path / "scored", progress=False)
    own = margins(tmp_path / "scored")
    scored = margins(tmp_path / "scored", model=biased / "model")
    assert scored["reward_margin"].abs().max() < 1e-3 and scored["avg_reward_margin"].abs().max() < 1e-4
    pd.testing.assert_series_equal(scored["logp_margin"], own["logp_margin"], rtol=1e-5)
    assert (scored["q"] == 1.0).all()  # zero reward margin -> q = 1


def test_napo_analyze_end_to_end(biased, tmp_path, capsys):
    from napo.cli import main
    from napo.train.run import train

    run = tmp_path / "run"
    config = {"max_steps": 2, "per_device_train_batch_size": 3, "logging_steps": 1, "learning_rate": 1e-3}
    train(biased / "model", biased / "biased", run, config=config, print_table=False, progress=False)
    labels = tmp_path / "labels.csv"
    idx = pd.read_parquet(biased / "biased")["idx"]
    pd.DataFrame({"idx": idx, "noisy": [i % 2 == 0 for i in range(len(idx))]}).to_csv(labels, index=False)
    output = tmp_path / "report"
    assert main(["analyze", "--data", str(biased / "biased"), "--model", str(biased / "model"), "--output",
                 str(output), "--run", str(run), "--noise-labels", str(labels), "--no-progress"]) == 0  # fmt: skip
    assert "report written" in capsys.readouterr().out
    report = (output / "report.md").read_text()
    for image in ("margin_hist.png", "length_margin_hist.png", "q_curve.png", "training_curves.png"):
        assert f"]({image})" in report and (output / image).read_bytes().startswith(PNG)
    assert "| term | noise | rows |" in report and "### language (lowest margins first)" in report
    table = pd.read_csv(output / "margins.csv")
    assert len(table) == 3 * len(idx) and set(table["noise"]) == {"noisy", "clean"}
    assert main(["analyze", "--data", str(biased / "biased"), "--output", str(tmp_path / "x")]) == 2
    assert "pass --model" in capsys.readouterr().err


def test_margin_histograms_count_whole_pairs():
    import matplotlib

    matplotlib.use("Agg")
    figure = plot_margin_hist(margins(cached_rows(), noise_labels="is_noisy"))  # 3 rows: counts of 0, 1 or 2
    for axis in figure.axes:
        ticks = axis.get_yticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), (axis.get_title(), list(ticks))


def test_analyze_refuses_before_writing_anything(tmp_path):
    from napo.analysis import analyze

    data = tmp_path / "cached.parquet"
    cached_rows().to_parquet(data)
    no_state = tmp_path / "run-without-state"
    no_state.mkdir()
    output = tmp_path / "report"
    with pytest.raises(FileNotFoundError, match=r"no trainer_state\.json"):
        analyze(data, output, run=no_state, progress=False)
    with pytest.raises(FileNotFoundError, match="noise labels"):
        analyze(data, output, noise_labels=str(tmp_path / "no-such-labels.csv"), progress=False)
    assert not output.exists()
    assert analyze(data, output, progress=False).is_file()  # the same data with good inputs is fine


# ---------------------------------------------------------------- user data in the report, user errors (issue 15)

INJECTION = "1\n\n![x](http://attacker.example/p.png) <img src=x onerror=alert(1)> | *b* `c`"


def test_data_derived_strings_are_escaped_in_the_report(tmp_path):
    from napo.analysis import analyze

    rows = cached_rows()
    rows["idx"] = [INJECTION, "8", "9"]
    data = tmp_path / "data`s\n# heading.parquet"
    rows.to_parquet(data)
    report = analyze(data, tmp_path / "report", progress=False).read_text()
    assert not re.search(r"(?<!\\)(!\[x\]|<img)", report) and "\n# heading" not in report  # nothing unescaped
    # Escaped only where Markdown would read markup (issue 25): the idx renders as itself, on one line.
    assert r"| 1 !\[x](http://attacker.example/p.png) \<img src=x onerror=alert(1)> \| \*b\* \`c\` |" in report
    lines = report.splitlines()
    for table_line in (line for line in lines if line.startswith("|")):
        assert table_line.endswith("|")  # no row broken across lines
    path = str(data).replace("\n", " ")
    assert f"Data: ``{path}``" in report  # the path as a code span fenced past its own backtick, on one line


def test_markdown_table_escapes_cells_and_headers_but_not_numbers():
    frame = pd.DataFrame({"idx": ["a|b", "<b>"], "n|x": [1, 2], "m": [0.5, float("nan")]})
    table = markdown_table(frame)
    assert table.splitlines() == [
        "| idx | n\\|x | m |",
        "|---|---|---|",
        "| a\\|b | 1 | 0.5 |",
        "| \\<b> | 2 | nan |",
    ]


def test_analyze_refuses_an_output_that_is_a_file(tmp_path):
    from napo.analysis import analyze

    cached_rows().to_parquet(tmp_path / "d.parquet")
    (tmp_path / "report").write_text("not a directory")
    with pytest.raises(ValueError, match="report is a file, not a directory"):
        analyze(tmp_path / "d.parquet", tmp_path / "report", progress=False)


def test_analyze_with_a_model_names_the_row_whose_image_is_undecodable(biased, tmp_path, capsys):
    from napo.cli import main
    from napo.train.reference import compute_reference_logps

    compute_reference_logps(biased / "model", biased / "biased", tmp_path / "scored", progress=False)
    frame = pd.read_parquet(tmp_path / "scored")
    frame.at[1, "image"] = {"bytes": b"not an image", "path": None}
    frame.to_parquet(tmp_path / "broken.parquet")
    code = main(["analyze", "--data", str(tmp_path / "broken.parquet"), "--model", str(biased / "model"),
                 "--output", str(tmp_path / "report"), "--device", "cpu", "--no-progress"])  # fmt: skip
    errors = [line for line in capsys.readouterr().err.splitlines() if "napo analyze" in line]  # past progress bars
    assert code == 2 and len(errors) == 1 and f"row idx {frame.at[1, 'idx']}: undecodable image" in errors[0]
