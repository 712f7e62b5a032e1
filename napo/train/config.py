"""``NaPOConfig``: TRL's ``DPOConfig`` plus the NaPO objective's settings, with the paper's defaults, checked when
the config is built (not at the first step); and how a config and a dataset's columns decide the active terms.

Imports TRL: ``import napo`` does not import this module (``napo.NaPOConfig`` does, on first use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from trl import DPOConfig
except ImportError as error:  # pragma: no cover - exercised by test_import_without_trl
    raise ImportError(
        "napo.train.config needs TRL (NaPOConfig is a DPOConfig subclass): pip install 'napo[train]' "
        f"(or pip install 'trl>=1.16,<2'). The import failed with: {error}"
    ) from error

from napo.data.prompts import check_prompt_format
from napo.losses import TermConfig
from napo.train.reference import DEFAULT_MAX_LENGTH

__all__ = ["BIASED_COLUMNS", "TERM_DEFAULTS", "NaPOConfig", "bf16_supported", "check_dpo_options", "resolve_terms"]

BIASED_COLUMNS = {"language": "question_only", "vision": "image_only"}
"""The column each biased term reads by default: ``napo generate``'s outputs."""

TERM_DEFAULTS = {  # loss, q, gamma, margin (spec: paper defaults)
    "original": ("auto", "adaptive", 0.01, "sum"),
    "language": ("napo", "adaptive", 0.5, "avg"),
    "vision": ("napo", "adaptive", 0.01, "sum"),
}


def _term_field(term: str, default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": f"[{term} term] {help_text}"})


def bf16_supported(use_cpu: bool = False) -> bool:
    """Whether training here can run under bf16 autocast: a CUDA device that supports it, not forced to the CPU."""
    return not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class NaPOConfig(DPOConfig):
    r"""DPOConfig plus the NaPO objective; the defaults are the paper's (LLaVA-v1.5-7B).

    Per term (``original``: chosen vs rejected; ``language``: chosen vs the language-biased answer;
    ``vision``: chosen vs the vision-biased answer):

    - ``<term>_loss``: ``"dpo"``, ``"napo"`` or ``"none"`` (term off). ``original_loss="auto"``: DPO when a
      biased term is active (the paper), adaptive NaPO when it is the only term (noise-robust DPO).
    - ``<term>_q``: ``"adaptive"`` (Eq. 12) or a fixed float in [0, 1] (as a string or number).
    - ``<term>_gamma``, ``<term>_margin``: the adaptive q's scale and margin kind (``"avg"``: avglogp, ``"sum"``: logp).
    - ``language_column`` / ``vision_column``: the generated column the biased term reads
      (``question_only``, ``question_only_black``, ...); ``"auto"``: the default column when the data has
      it, else the term is off; ``"none"``: off. A named column the data lacks is an error.

    ``napo_weights``: ``"dynamic"`` (Eq. 13), ``"none"`` (all 1) or comma-separated floats, one per active term.
    ``q_min`` / ``w_min``: the clip floors of q and of the dynamic weights.

    The defaults are the authors' training recipe (zhangzef/NaPO, ``llava15_train_bias.sh``), which differs
    from DPOConfig's in: ``learning_rate=5e-7`` (TRL: 1e-6), ``num_train_epochs=4`` (3),
    ``per_device_train_batch_size=4`` (8), ``lr_scheduler_type="cosine"`` (linear), ``warmup_steps=0.1``
    (a 10% warmup; TRL: none), ``weight_decay=0.01`` (0) and ``max_length=2048`` (1024: with LLaVA-1.5's
    576 image tokens, 1024 cuts long answers). beta is 0.1 in both. ``original_loss="dpo"`` with the
    biased terms off gives TRL's sigmoid DPO objective exactly; on a plain DPO dataset the default
    (``"auto"``) is adaptive NaPO, the noise-robust DPO.
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "Paper: 5e-7 (LLaVA-v1.5)."})
    num_train_epochs: float = field(default=4.0, metadata={"help": "Paper: 4 (1 for 13B)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Paper: 4."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup: a number of steps, or a fraction of all steps when < 1. Paper: 0.1."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "Paper: 0.01."})
    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={"help": "Prompt + answer tokens (image tokens included) kept. Paper: 2048."},
    )

    original_loss: str = _term_field("original", "auto", "dpo, napo, none or auto")
    original_q: str = _term_field("original", "adaptive", "adaptive or a float in [0, 1]")
    original_gamma: float = _term_field("original", 0.01, "scale of the adaptive q")
    original_margin: str = _term_field("original", "sum", "avg (avglogp) or sum (logp) margin for q")
    language_column: str = _term_field("language", "auto", "column of language-biased answers")
    language_loss: str = _term_field("language", "napo", "dpo, napo or none")
    language_q: str = _term_field("language", "adaptive", "adaptive or a float in [0, 1]")
    language_gamma: float = _term_field("language", 0.5, "scale of the adaptive q")
    language_margin: str = _term_field("language", "avg", "avg or sum")
    vision_column: str = _term_field("vision", "auto", "column of vision-biased answers")
    vision_loss: str = _term_field("vision", "napo", "dpo, napo or none")
    vision_q: str = _term_field("vision", "adaptive", "adaptive or a float in [0, 1]")
    vision_gamma: float = _term_field("vision", 0.01, "scale of the adaptive q")
    vision_margin: str = _term_field("vision", "sum", "avg or sum")
    prompt_format: str = field(
        default="template",
        metadata={"help": "template (the checkpoint's chat template) or llava_v1 (the authors' LLaVA-1.5 format)"},
    )
    napo_weights: str = field(default="dynamic", metadata={"help": "dynamic, none, or comma-separated floats"})
    q_min: float = field(default=0.001, metadata={"help": "lower clip of the adaptive q"})
    w_min: float = field(default=0.01, metadata={"help": "lower clip of the dynamic weights"})

    def __post_init__(self) -> None:
        if self.bf16 is None:
            # TRL turns bf16 on whatever the device, and TrainingArguments then refuses a CPU machine: here bf16
            # (autocast) is on where the device supports it, so NaPOConfig(output_dir=...) works everywhere.
            self.bf16 = not self.fp16 and bf16_supported(self.use_cpu)
        super().__post_init__()
        check_prompt_format(self.prompt_format)
        # The objective's own checks, with its messages, at construction rather than at the first step.
        from napo import functional as F_napo
        from napo.data.inputs import check_int

        F_napo._check_positive("beta", self.beta)
        F_napo._check_q_bounds(self.q_min, 1.0)
        F_napo._check_unit_interval("w_min", self.w_min)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 1)
        for term in TERM_DEFAULTS:
            loss = getattr(self, f"{term}_loss")
            allowed = ("auto", "dpo", "napo", "none") if term == "original" else ("dpo", "napo", "none")
            if loss not in allowed:
                raise ValueError(f"{term}_loss must be one of {', '.join(allowed)}, got {loss!r}")
            self.term_config(term, loss="napo")  # validates q, gamma and margin now, not at the first step
        weights = self.weight_setting()
        if isinstance(weights, list):
            self._check_weight_count(len(weights))

    def _check_weight_count(self, count: int) -> None:
        """Fixed weights are one per active term: at most the terms configured on, at least those sure to be on
        (a biased term whose column is ``auto`` is on only when the data has the column)."""
        possible, certain = [], []
        for term in TERM_DEFAULTS:
            if getattr(self, f"{term}_loss") == "none" or getattr(self, f"{term}_column", "") == "none":
                continue
            possible.append(term)
            if getattr(self, f"{term}_column", "") != "auto":
                certain.append(term)
        if not len(certain) <= count <= len(possible):
            expected = f"{len(possible)}" if len(certain) == len(possible) else f"{len(certain)} to {len(possible)}"
            raise ValueError(
                f"weights has {count} values but {expected} terms are active ({', '.join(possible) or 'none'}): "
                "napo_weights needs one value per active term"
            )

    def term_config(self, term: str, loss: str | None = None) -> TermConfig:
        """The :class:`TermConfig` of one term (``loss`` overrides the configured kind, e.g. a resolved auto)."""
        q: Any = getattr(self, f"{term}_q")
        if isinstance(q, str) and q != "adaptive":
            try:
                q = float(q)
            except ValueError:
                raise ValueError(f"{term}_q must be 'adaptive' or a float in [0, 1], got {q!r}") from None
        return TermConfig(
            loss=loss or getattr(self, f"{term}_loss"),
            q=q,
            gamma=getattr(self, f"{term}_gamma"),
            margin=getattr(self, f"{term}_margin"),
        )

    def weight_setting(self) -> str | list[float]:
        """``napo_weights`` as :class:`napo.NaPOObjective` takes it."""
        if isinstance(self.napo_weights, (list, tuple)):
            values: Sequence[Any] = self.napo_weights
        elif self.napo_weights in ("dynamic", "none"):
            return self.napo_weights
        else:
            values = str(self.napo_weights).split(",")
        try:
            weights = [float(v) for v in values]
        except ValueError:
            raise ValueError(
                f"napo_weights must be 'dynamic', 'none' or comma-separated floats, got {self.napo_weights!r}"
            ) from None
        if any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise ValueError(f"napo_weights must be finite and >= 0, got {weights}")
        return weights


def resolve_terms(args: NaPOConfig, names: Sequence[str]) -> dict[str, tuple[TermConfig, str]]:
    """Active terms -> (TermConfig, the rejected-side column), from the config and the data's column names."""
    terms: dict[str, tuple[TermConfig, str]] = {}
    for term in ("language", "vision"):
        column = getattr(args, f"{term}_column")
        if getattr(args, f"{term}_loss") == "none" or column == "none":
            continue
        if column == "auto":
            column = BIASED_COLUMNS[term]
            if column not in names:
                continue
        elif column not in names:
            raise ValueError(
                f"{term}_column={column!r} but the dataset has no such column (it has: {', '.join(names)}); "
                f"run `napo generate` to add the biased answers, or set {term}_column='none'"
            )
        terms[term] = (args.term_config(term), column)
    original = args.original_loss
    if original != "none":
        for column in ("chosen", "rejected"):
            if column not in names:
                raise ValueError(f"the dataset has no {column!r} column (it has: {', '.join(names)})")
        if original == "auto":
            original = "dpo" if terms else "napo"
        terms = {"original": (args.term_config("original", loss=original), "rejected"), **terms}
    if not terms:
        raise ValueError("no NaPO term is active: enable original_loss or a biased term whose column the data has")
    if "chosen" not in names:
        raise ValueError(f"the dataset has no 'chosen' column (it has: {', '.join(names)})")
    return terms


def check_dpo_options(args: NaPOConfig) -> None:
    """DPO options that change the DPO loss itself have no meaning under the NaPO objective."""
    problems = []
    if list(args.loss_type) != ["sigmoid"]:
        problems.append(f"loss_type={args.loss_type!r} (NaPO replaces the loss)")
    if args.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type={args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        problems.append(f"ld_alpha={args.ld_alpha!r}")
    if args.use_weighting:
        problems.append("use_weighting=True")
    if args.label_smoothing:
        problems.append(f"label_smoothing={args.label_smoothing!r}")
    if problems:
        raise ValueError("NaPOTrainer does not support these DPO options: " + "; ".join(problems))
