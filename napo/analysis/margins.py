"""Margins of every preference pair, the q each would induce, and the pairs NaPO treats as noise.

Paper: NaPO, Figure 4 (log-prob margins of noisy vs clean biased answers), Table 7 (length
margins), Eq. 12 (q). One row per (dataset row, term): ``original`` is chosen vs rejected,
``language`` chosen vs the language-biased answer (``question_only``), ``vision`` chosen vs the
vision-biased answer (``image_only``).

Without a model, the margins are the data's own: the cached reference log-probs
(``ref_<column>_logps``, from ``napo logps``), i.e. the reference model as the policy. With a model
(a trained checkpoint, say), its log-probs are scored, and where the data has reference columns
the reward margin of Eq. 2 is added as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napo.losses import PAPER_TERMS, TermConfig
from napo.train.reference import DEFAULT_MAX_LENGTH

__all__ = ["TERM_COLUMNS", "margins", "noise_ranking", "q_at", "read_noise_labels", "summarize"]

TERM_COLUMNS = {"original": "rejected", "language": "question_only", "vision": "image_only"}
"""The answer each term sets against ``chosen`` (by default; ``columns=`` overrides)."""

DEFAULT_TERMS = {
    "original": TermConfig(loss="napo", q="adaptive", gamma=0.01, margin="sum"),  # NaPOConfig's noise-robust DPO
    "language": PAPER_TERMS["language"],
    "vision": PAPER_TERMS["vision"],
}


def q_at(margin: Any, gamma: float, q_min: float = 0.001, q_max: float = 1.0) -> Any:
    """Eq. 12 at a given (batch-mean) margin: ``clip(2 * (1 - sigmoid(gamma * margin)), q_min, q_max)``.
    Works on floats, NumPy arrays and pandas Series."""
    import numpy as np

    value = 2.0 * (1.0 - 1.0 / (1.0 + np.exp(-gamma * np.asarray(margin, dtype=np.float64))))
    clipped = np.clip(value, q_min, q_max)
    return float(clipped) if np.ndim(clipped) == 0 else clipped


def as_frame(data: Any):
    """A pandas frame of ``data``: a DataFrame (copied), a Dataset or Arrow table, or a Parquet file or directory."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data.copy()
    if hasattr(data, "to_pandas"):  # datasets.Dataset, pyarrow.Table
        return data.to_pandas()
    from napo.data.store import parquet_dataset

    path = Path(data)
    if path.is_file() or path.is_dir():
        return parquet_dataset(path).to_table().to_pandas()
    raise FileNotFoundError(f"no such file or directory: {data}")


def _data_root(data: Any) -> Path | None:
    """Where the data's relative image paths resolve: its directory (None for in-memory data)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        return path.parent if path.is_file() else path if path.is_dir() else None
    return None


def _label(value: Any, where: str) -> str:
    if hasattr(value, "item") and not isinstance(value, str):  # NumPy / pandas scalars
        value = value.item()
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("noisy", "noise", "true", "1", "yes"):
            return "noisy"
        if lowered in ("clean", "false", "0", "no"):
            return "clean"
    elif (
        isinstance(value, (bool, int, float))
        and not (isinstance(value, float) and math.isnan(value))
        and value in (0, 1)
    ):
        return "noisy" if value else "clean"
    raise ValueError(f"{where}: a noise label must be noisy/clean, true/false or 1/0, got {value!r}")


def noise_label_sources(noise_labels: Any, terms: Any) -> dict[str, Any]:
    """term -> its label source: ``noise_labels`` is one source for every term, or a dict term -> source."""
    per_term = isinstance(noise_labels, Mapping) and set(noise_labels) <= set(TERM_COLUMNS)
    return dict(noise_labels) if per_term else dict.fromkeys(terms, noise_labels)


def read_noise_labels(source: Any, data: Any = None) -> dict[Any, str]:
    """idx -> "noisy" | "clean" from: a column name of ``data``; a mapping or pandas Series idx -> label;
    or a CSV / JSON / Parquet file with an ``idx`` column and one of ``noisy``, ``noise``, ``label``."""
    import pandas as pd

    if isinstance(source, str) and data is not None and source in data.columns:
        return {i: _label(v, f"column {source!r}, idx {i!r}") for i, v in zip(data["idx"], data[source], strict=True)}
    if isinstance(source, (Mapping, pd.Series)):
        return {i: _label(v, f"idx {i!r}") for i, v in dict(source).items()}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"noise labels: {source!r} is neither a column of the data nor a file")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix == ".json":
        raw = pd.read_json(path, typ="series" if path.read_text().lstrip().startswith("{") else "frame")
        table = raw.rename("label").rename_axis("idx").reset_index() if isinstance(raw, pd.Series) else raw
    else:
        table = pd.read_csv(path)
    column = next((c for c in ("noisy", "noise", "label") if c in table.columns), None)
    if "idx" not in table.columns or column is None:
        raise ValueError(f"{path}: needs an 'idx' column and one of noisy / noise / label, has {list(table.columns)}")
    return {i: _label(v, f"{path.name}, idx {i!r}") for i, v in zip(table["idx"], table[column], strict=True)}


def _score_model(
    model: Any, frame, columns: list[str], batch_size: int, device: str, dtype: str, progress: bool,
    max_length: int | None, data_root: Path | None = None, allow_outside_images: bool = False,
    prompt_format: str = "template",
):  # fmt: skip
    """Per answer column, (sums, averages) lists under ``model`` (a directory or a loaded (model, processor))."""
    from tqdm.auto import tqdm

    from napo.data.store import RowError
    from napo.models.loading import decode_image, load_model

    def image(row: dict):
        try:
            return decode_image(row["image"], data_root, allow_outside_images)
        except RowError as error:
            # Every row needs a margin here (no skipping as napo logps does): name the row to fix or drop.
            raise ValueError(f"row idx {row.get('idx')!r}: {error}; scoring a model needs every row's image") from None

    from napo.train.collator import NaPOVisionCollator
    from napo.train.lm_head import add_napo_lm_head
    from napo.train.reference import check_vocabulary, score_examples

    loaded = load_model(model, device=device, dtype=dtype) if isinstance(model, (str, Path)) else model
    policy, processor = loaded
    check_vocabulary(policy, processor)
    add_napo_lm_head(policy)
    collator = NaPOVisionCollator(processor=processor, columns=columns, max_length=max_length,
                                  prompt_format=prompt_format)  # fmt: skip
    out: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in columns}
    records = frame.to_dict("records")
    for start in tqdm(range(0, len(records), batch_size), disable=not progress, desc="napo: scoring", unit="batch"):
        rows = records[start : start + batch_size]
        examples = [{"image": image(r), "question": r["question"], **{c: r[c] for c in columns}} for r in rows]
        for column, scored in score_examples(policy, collator, examples).items():
            out[column][0].extend(scored.logps.float().tolist())
            out[column][1].extend(scored.avg_logps.float().tolist())
    return out


def margins(
    data: Any,
    model: Any = None,
    *,
    terms: Mapping[str, TermConfig] | None = None,
    columns: Mapping[str, str] | None = None,
    noise_labels: Any = None,
    q_min: float = 0.001,
    batch_size: int = 8,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    allow_outside_images: bool = False,
    prompt_format: str = "template",
):
    """A DataFrame with one row per (data row, term) and the margins NaPO works from.

    Args:
        data: a DataFrame, a ``datasets.Dataset``, or a Parquet file / directory (``napo generate`` /
            ``napo logps`` output). Needs ``idx``; without ``model`` the ``ref_<column>_logps`` and
            ``ref_<column>_avg_logps`` of ``chosen`` and each term's answer; with ``model`` the rows'
            ``image``, ``question`` and answer texts.
        model: None (the data's own margins), a checkpoint directory, or a loaded ``(model, processor)``.
        terms: term -> :class:`napo.TermConfig` whose ``gamma`` and ``margin`` kind give the ``q`` column
            (default: the paper's for language and vision; logp, gamma 0.01 for original). Terms whose
            answer column the data lacks are left out.
        columns: term -> answer column (default :data:`TERM_COLUMNS`; e.g. ``{"language": "question_only_black"}``).
        noise_labels: optional: a column of ``data``, a mapping/Series idx -> label, or a file (see
            :func:`read_noise_labels`); or a dict term -> any of those, for labels that differ per term.
        max_length: when scoring a model, truncate prompt + answer as the reference columns were
            (``napo logps`` records it; 2048 is its and the trainer's default); None: no truncation.
        allow_outside_images: when scoring a model, read image paths outside the data's directory.
        prompt_format: when scoring a model, the prompt format the reference columns were scored with
            (``napo logps`` records it).
    Returns:
        Columns ``idx, term, answer, chosen_logps, answer_logps, chosen_avg_logps, answer_avg_logps,
        logp_margin, avg_logp_margin, length_margin, q`` (+ ``reward_margin, avg_reward_margin`` when a
        model is scored against cached reference columns, + ``noise`` when labels are given).
        ``length_margin`` is n_tokens(chosen) - n_tokens(answer), recovered exactly as logps / avg_logps.
        ``q`` is the term's q at this row's margin: Eq. 12 for an adaptive term (margin of the term's kind;
        the reward margin when present), the fixed q for a fixed one, 0 for a DPO term.
    """
    import numpy as np
    import pandas as pd

    from napo.data.inputs import check_answer_columns, check_int
    from napo.train.collator import reference_columns

    check_int("batch_size", batch_size, 1)
    if max_length is not None:
        check_int("max_length", max_length, 1)
    frame = as_frame(data)
    if "idx" not in frame.columns:
        raise ValueError(f"the data needs an 'idx' column (has: {', '.join(map(str, frame.columns))})")
    configs = {**DEFAULT_TERMS, **(terms or {})}
    answers = {**TERM_COLUMNS, **(columns or {})}
    unknown = set(configs) - set(TERM_COLUMNS) | set(answers) - set(TERM_COLUMNS)
    if unknown:
        raise ValueError(f"unknown term(s) {sorted(unknown)}; terms are {', '.join(TERM_COLUMNS)}")

    def cached(column: str) -> bool:
        return all(name in frame.columns for name in reference_columns(column))

    if model is None:
        # The data's own margins: the terms whose answer has cached reference columns (texts not needed).
        active = {term: answers[term] for term in TERM_COLUMNS if cached(answers[term])}
        if not cached("chosen") or not active:
            missing = [n for c in ["chosen", *answers.values()] for n in reference_columns(c) if n not in frame.columns]
            raise ValueError(
                f"without a model the margins come from cached reference columns, and these are missing: "
                f"{', '.join(missing)}; run `napo logps` first or pass a model"
            )
    else:
        active = {term: answers[term] for term in TERM_COLUMNS if answers[term] in frame.columns}
        missing = [c for c in ("image", "question", "chosen") if c not in frame.columns]
        if missing or not active:
            raise ValueError(
                f"scoring a model needs image, question, chosen and at least one of {', '.join(answers.values())}; "
                f"the data lacks {', '.join(missing) or 'every answer column'}"
            )
    needed = ["chosen", *active.values()]
    has_reference = all(cached(c) for c in needed)
    if model is None:
        scored = {c: (frame[reference_columns(c)[0]].to_numpy(float), frame[reference_columns(c)[1]].to_numpy(float))
                  for c in needed}  # fmt: skip
    else:
        check_answer_columns(frame.columns, list(dict.fromkeys(needed)))  # no prompt column scored as an answer
        lists = _score_model(model, frame, needed, batch_size, device, dtype, progress, max_length, _data_root(data),
                             allow_outside_images, prompt_format)  # fmt: skip
        scored = {c: (np.asarray(s, dtype=float), np.asarray(a, dtype=float)) for c, (s, a) in lists.items()}

    def tokens(sums, avgs):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(avgs != 0, np.rint(sums / np.where(avgs != 0, avgs, 1.0)), 0.0)

    pieces = []
    chosen_sum, chosen_avg = scored["chosen"]
    for term, column in active.items():
        answer_sum, answer_avg = scored[column]
        piece = pd.DataFrame({
            "idx": frame["idx"].to_numpy(),
            "term": term,
            "answer": column,
            "chosen_logps": chosen_sum,
            "answer_logps": answer_sum,
            "chosen_avg_logps": chosen_avg,
            "answer_avg_logps": answer_avg,
            "logp_margin": chosen_sum - answer_sum,
            "avg_logp_margin": chosen_avg - answer_avg,
            "length_margin": tokens(chosen_sum, chosen_avg) - tokens(answer_sum, answer_avg),
        })  # fmt: skip
        if model is not None and has_reference:
            ref_c, ref_c_avg = (frame[n].to_numpy(float) for n in reference_columns("chosen"))
            ref_a, ref_a_avg = (frame[n].to_numpy(float) for n in reference_columns(column))
            piece["reward_margin"] = (chosen_sum - ref_c) - (answer_sum - ref_a)
            piece["avg_reward_margin"] = (chosen_avg - ref_c_avg) - (answer_avg - ref_a_avg)
        config = configs[term]
        if config.adaptive:
            piece["q"] = q_at(piece[margin_column_of(piece, config)], config.gamma, q_min)
        else:
            piece["q"] = 0.0 if config.loss == "dpo" else float(config.q)
        pieces.append(piece)
    result = pd.concat(pieces, ignore_index=True)
    if noise_labels is not None:
        sources = noise_label_sources(noise_labels, active)
        result["noise"] = None
        for term, source in sources.items():
            labels = read_noise_labels(source, frame)
            rows = result["term"] == term
            result.loc[rows, "noise"] = result.loc[rows, "idx"].map(labels)
        unlabelled = result["noise"].isna() & result["term"].isin(list(sources))
        if unlabelled.any():
            missing = result.loc[unlabelled, "idx"].unique()[:5].tolist()
            raise ValueError(f"no noise label for idx {missing} (labels must cover every row)")
    return result


def margin_column_of(frame, config: TermConfig) -> str:
    """The column Eq. 12 reads for a term: avg or sum; the reward margin when a policy was scored."""
    prefix = "avg_" if config.margin == "avg" else ""
    return f"{prefix}reward_margin" if "reward_margin" in frame.columns else f"{prefix}logp_margin"


def summarize(frame, terms: Mapping[str, TermConfig] | None = None, q_min: float = 0.001):
    """Per term (and noise label, when present): count, mean / median margins, the share of negative
    logp margins (the model prefers the biased answer), mean length margin, and the q Eq. 12 gives at
    the batch-mean margin of the term's kind."""
    import pandas as pd

    configs = {**DEFAULT_TERMS, **(terms or {})}
    keys = ["term", "noise"] if "noise" in frame.columns else ["term"]
    rows = []
    for key, group in frame.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        config = configs[key[0]]
        margin_column = margin_column_of(group, config)
        row = dict(zip(keys, key, strict=True))
        row.update({
            "rows": len(group),
            "mean logp margin": group["logp_margin"].mean(),
            "median logp margin": group["logp_margin"].median(),
            "mean avg-logp margin": group["avg_logp_margin"].mean(),
            "share negative": (group["logp_margin"] < 0).mean(),
            "mean length margin": group["length_margin"].mean(),
            "q margin": margin_column,
            "gamma": config.gamma,
            "q at mean": q_at(group[margin_column].mean(), config.gamma, q_min),
        })  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def noise_ranking(frame, term: str = "language", top: int | None = 20, beta: float = 0.1,
                  terms: Mapping[str, TermConfig] | None = None, q_min: float = 0.001):  # fmt: skip
    """The rows of one term that NaPO treats as most likely noisy, most suspicious first.

    NaPO's gradient on a pair is DPO's times ``sigmoid(beta * M) ** q`` (spec: dL_q/dM), so the pairs
    with the lowest margin M are the ones it down-weights most. Rows are sorted by the term's margin
    (its kind; the reward margin when a policy was scored), with ``napo_weight`` = that factor at the
    term's q (Eq. 12 at the mean margin over ``frame``), and ``rank`` from 1.
    """
    import numpy as np

    configs = {**DEFAULT_TERMS, **(terms or {})}
    if term not in configs:
        raise ValueError(f"unknown term {term!r}; terms are {', '.join(TERM_COLUMNS)}")
    rows = frame[frame["term"] == term]
    if rows.empty:
        raise ValueError(f"the frame has no rows for term {term!r} (terms present: {sorted(frame['term'].unique())})")
    config = configs[term]
    column = margin_column_of(rows, config)
    q = q_at(rows[column].mean(), config.gamma, q_min)
    ranked = rows.sort_values(column, kind="stable").copy()
    ranked["napo_weight"] = np.exp(q * -np.logaddexp(0.0, -beta * ranked[column].to_numpy(float)))
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    ranked = ranked.reset_index(drop=True)
    return ranked if top is None else ranked.head(top)
