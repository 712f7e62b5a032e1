"""``napo train``: NaPO on ``napo generate``'s output, from a checkpoint directory to a trained one.

Steps: cache the reference log-probs (``napo logps``) when the data lacks them, then train with
:class:`napo.train.trainer.NaPOTrainer` on the paper's defaults (overridable by flags or a
JSON/YAML config of ``NaPOConfig`` fields), resume from the newest ``checkpoint-*`` in the output
directory when rerun, and save the final model and processor there (``from_pretrained`` loads it).
Under ``torchrun`` / ``accelerate launch`` each process scores its shard of the reference log-probs,
then all train together with the Trainer's own distributed support (pass DeepSpeed / FSDP settings
in the config file).
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "check_engine_settings",
    "engine_summary",
    "last_complete_checkpoint",
    "load_config_file",
    "step_table_callback",
    "train",
]

REFERENCE_DIR = "reference-logps"
RUN_RECORD = "napo_train.json"  # in the output: the settings a rerun must share to resume the run

# The TrainingArguments / DPOConfig fields that change the trained weights (NaPOConfig's own fields are all
# recorded as well); the rest (logging, saving, progress bars, report_to) may differ between a run and its resume.
_RESULT_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args", "seed", "data_seed", "full_determinism",
    "bf16", "fp16", "tf32", "beta", "max_length", "max_prompt_length", "max_completion_length", "truncation_mode",
    "padding_free", "dataloader_drop_last", "group_by_length",
)  # fmt: skip


def load_config_file(path: str | Path) -> dict[str, Any]:
    """NaPOConfig fields from a ``.json`` or ``.yaml``/``.yml`` file (a flat mapping). Every way the file
    can be wrong is a ValueError naming it (FileNotFoundError when it is missing); YAML is read with
    ``safe_load``, which refuses the tags that would construct Python objects."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a directory; give a JSON or YAML file of NaPOConfig fields")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"config {path} is not UTF-8 text ({error.reason}); give a JSON or YAML file") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            # The parser's message spans lines (problem, context, a caret): keep the problem and its place.
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"config {path} is not valid YAML{where}: {problem}") from None
    else:
        try:
            values = json.loads(text)
        except ValueError as error:
            raise ValueError(f"config {path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config {path} must hold a mapping of NaPOConfig fields, got {type(values).__name__}")
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise ValueError(f"config {path}: field names must be strings, got {odd[0]!r}")
    return values


def check_engine_settings(values: dict[str, Any]) -> None:
    """Refuses, before any model loads, DeepSpeed / FSDP settings that would fail (or leave no loadable model)
    only after the models are loaded and sharded: the engine is not installed, a ``zero_optimization`` key
    DeepSpeed does not know (checked by DeepSpeed's own config model), and ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save``, which ``napo train`` needs to save a ``from_pretrained``
    model (without it only the per-rank shards are written).

    With no ``deepspeed`` field, the same holds for the DeepSpeed settings ``accelerate launch`` hands over from
    an accelerate config with ``distributed_type: DEEPSPEED`` (TRL's way of choosing the engine): its
    ``deepspeed_config_file``, or ``zero_stage: 3`` without ``zero3_save_16bit_model: true``."""
    settings = values.get("deepspeed")
    if not settings and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        settings = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        settings = None if settings == "none" else settings
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        gathered = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true"
        if settings is None and stage == "3" and not gathered:
            raise ValueError(
                "accelerate's DeepSpeed settings ask for ZeRO-3 without zero3_save_16bit_model: true: the final "
                "model could not be gathered into one from_pretrained checkpoint; set it to true in the accelerate "
                "config (or pass --zero3_save_16bit_model true to accelerate launch)"
            )
    if settings:
        try:
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        except ImportError as error:
            raise ValueError(
                f"deepspeed={settings!r} needs DeepSpeed, which is not installed (pip install deepspeed): {error}"
            ) from None
        if not isinstance(settings, dict):
            settings = load_config_file(settings)
        zero = dict(settings.get("zero_optimization") or {})
        # "auto" values are the Trainer's to fill in from the training arguments; DeepSpeed's model rejects them.
        try:
            config = DeepSpeedZeroConfig(**{key: value for key, value in zero.items() if value != "auto"})
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"the DeepSpeed config's zero_optimization section is not valid: {error}") from None
        if int(config.stage) == 3 and not config.gather_16bit_weights_on_model_save:
            raise ValueError(
                "DeepSpeed ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save=true: the "
                "final model could not be gathered into one from_pretrained checkpoint; set it to true"
            )
    if values.get("fsdp"):
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 - FSDP2, torch >= 2.6
        except ImportError as error:
            raise ValueError(f"fsdp needs FSDP2 (torch >= 2.6), which this torch lacks: {error}") from None


def warn_if_fsdp_on_cpu(fsdp: Any, device_type: str) -> None:
    """accelerate (1.15) drops FSDP settings when the processes are CPU ones and runs them as plain DDP, without a
    word; a user who asked for FSDP (``fsdp=`` or ``accelerate launch`` with an FSDP config) hears it here."""
    asked = bool(fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and device_type == "cpu":
        warnings.warn(
            "napo train: fsdp is set, but the processes run on the CPU, where accelerate ignores FSDP and trains "
            "with plain DDP: every process holds the whole model, its gradients and its optimizer state. FSDP "
            "needs GPU processes; on CPU processes DeepSpeed ZeRO (deepspeed=..., DS_ACCELERATOR=cpu) shards them",
            UserWarning,
            stacklevel=3,
        )


def engine_summary(trainer: Any) -> str:
    """How the Trainer runs, as ``napo train`` prints it: processes, their device, the engine. What the launcher and
    the settings gave, not what was asked: accelerate runs FSDP settings on CPU processes as DDP, and a
    ``MULTI_CPU`` accelerate config without ``mpirun`` starts one process."""
    accelerator = trainer.accelerator
    count = accelerator.num_processes
    text = f"{count} process{'' if count == 1 else 'es'} ({accelerator.device.type})"
    if trainer.is_deepspeed_enabled:
        return f"{text}, DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return f"{text}, FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return f"{text}, DDP" if count > 1 else text


def last_complete_checkpoint(output: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (the Trainer writes it last) is whole.

    The Trainer writes checkpoints in place, so a run killed while saving leaves a partial directory
    that ``get_last_checkpoint`` would pick and fail to load; such directories are passed over."""
    if not output.is_dir():
        return None
    steps = []
    for path in output.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    for _, path in sorted(steps, reverse=True):
        if not checkpoint_complete(path):
            print(f"napo train: {path} is incomplete (killed while saving?); not resuming from it")
            continue
        return path
    return None


def checkpoint_complete(path: Path) -> bool:
    """Whether a checkpoint directory's ``trainer_state.json``, the file the Trainer writes last, is whole."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def run_settings(args: Any, model: str | Path, data: str | Path) -> dict[str, Any]:
    """What decides a run's result: the model, the data and every result-changing field of ``args``, as JSON
    values (what :data:`RUN_RECORD` holds)."""
    from napo.train.trainer import NaPOConfig

    own = set(NaPOConfig.__annotations__)
    values = {key: value for key, value in args.to_dict().items() if key in own or key in _RESULT_FIELDS}
    where = {"model": model, "data": data}
    recorded = {key: str(Path(p).resolve()) if Path(p).exists() else str(p) for key, p in where.items()}
    return json.loads(json.dumps({**recorded, **dict(sorted(values.items()))}, default=str))


def check_run_record(output: Path, settings: dict[str, Any]) -> None:
    """Refuses to resume a run in ``output`` that was started with other settings (a checkpoint of another
    learning rate, beta or step count would otherwise be resumed, or returned as it is, without a word)."""
    path = output / RUN_RECORD
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} (the settings of the run in {output}) cannot be read ({error}); add --overwrite "
            "(overwrite=True) to start the run again, or choose another --output"
        ) from None
    differences = [
        f"{key} {previous.get(key, '(not set)')!r} (this run: {settings.get(key, '(not set)')!r})"
        for key in sorted(set(previous) | set(settings))
        if previous.get(key) != settings.get(key)
    ]
    if differences:
        raise ValueError(
            f"{output} holds a napo train run with other settings: {'; '.join(differences)}. Rerun with the "
            "recorded settings to resume it, add --overwrite (overwrite=True) to delete its checkpoints and start "
            "again, or choose another --output"
        )


def clear_run(output: Path) -> None:
    """What ``--overwrite`` deletes: the checkpoints, the cached reference log-probs and the run record (the
    final model's files are written again at the end)."""
    import shutil

    for path in output.glob("checkpoint-*"):
        if path.is_dir():
            shutil.rmtree(path)
    shutil.rmtree(output / REFERENCE_DIR, ignore_errors=True)
    (output / RUN_RECORD).unlink(missing_ok=True)


class DiskFullError(OSError):
    """The disk filled up while ``napo train`` was saving (the message says what and how to go on)."""


_WRITE_FAILURE_WORDS = ("file write failed", "unexpected pos", "No space left on device", "Disk quota exceeded")
_LOW_SPACE = 64 * 2**20  # bytes: below this a failed write is taken for a full disk


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether ``error`` (raised while writing under ``where``) means the disk is full: an ENOSPC/EDQUOT
    OSError anywhere in its chain, or a writer's failure message (torch's zip writer says only ``unexpected pos
    614144 vs 614036``) while the disk holding ``where`` has next to no space left."""
    import errno
    import shutil

    seen: BaseException | None = error
    worded = False
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        worded = worded or any(words in str(seen) for words in _WRITE_FAILURE_WORDS)
        seen = seen.__cause__ or seen.__context__
    if not worded:
        return False
    try:
        return shutil.disk_usage(where).free < _LOW_SPACE
    except OSError:
        return False


def guard_saves(trainer: Any, output: Path) -> None:
    """Makes a full disk during a checkpoint save one clear :class:`DiskFullError` (the writers' own messages
    do not say it), after removing the partial checkpoint so that nothing can take it for a complete one."""
    import shutil

    save_checkpoint = trainer._save_checkpoint

    def saving(*args: Any, **kwargs: Any) -> Any:
        try:
            return save_checkpoint(*args, **kwargs)
        except Exception as error:
            if not disk_full(error, output):
                raise
            partial = output / f"checkpoint-{trainer.state.global_step}"
            if partial.is_dir() and not checkpoint_complete(partial):
                shutil.rmtree(partial, ignore_errors=True)
            raise DiskFullError(
                f"no space left on device while saving {partial.name} in {output}; free space and rerun the same "
                "command to resume from the last complete checkpoint"
            ) from error

    trainer._save_checkpoint = saving


def step_table_callback():
    """A TrainerCallback printing one row per logging step: loss, q, weights and margins per term."""
    from transformers import TrainerCallback

    class StepTable(TrainerCallback):
        header_printed = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            terms = [k.removeprefix("napo/q_") for k in logs if k.startswith("napo/q_")]
            if not self.header_printed:
                columns = ["step", "loss"] + [f"{kind}_{t[:4]}" for kind in ("q", "w", "m") for t in terms]
                print(" ".join(f"{c:>9}" for c in columns), flush=True)
                self.header_printed = True
            values = [logs["loss"]]
            for kind in ("q", "weight", "margin"):
                values += [logs.get(f"napo/{kind}_{t}", float("nan")) for t in terms]
            print(f"{state.global_step:>9d} " + " ".join(f"{v:>9.4f}" for v in values), flush=True)

    return StepTable()


def train(
    model: str | Path,
    data: str | Path,
    output: str | Path,
    *,
    config: dict[str, Any] | None = None,
    logps_batch_size: int = 8,
    progress: bool = True,
    print_table: bool = True,
    overwrite: bool = False,
) -> Path:
    """Trains ``model`` with NaPO on ``data`` into ``output``; returns the output directory.

    Args:
        model: a vision-language checkpoint directory (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Gemma 3,
            Idefics3 / SmolVLM; or a hub id where reachable): policy and reference.
        data: ``napo generate`` (or ``napo logps``) output: Parquet with the RLAIF-V-Bias columns.
        output: where checkpoints, the reference-log-prob cache and the final model go.
        config: NaPOConfig fields (``max_steps``, ``learning_rate``, ``beta``, ``language_column``, ...).
        logps_batch_size: rows per forward when the reference log-probs are computed first.
        overwrite: delete the checkpoints and cached reference log-probs of an earlier run in ``output`` and
            start again (without it, a rerun resumes, and a rerun with other settings is refused).
    """
    import torch
    from accelerate import PartialState
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText

    from napo.data.prompts import check_checkpoint_prompt_format
    from napo.data.store import parquet_files, parquet_schema
    from napo.models.loading import load_weights
    from napo.models.processors import load_processor
    from napo.train.reference import cached_settings, compute_reference_logps, scored_columns
    from napo.train.trainer import NaPOConfig, NaPOTrainer, resolve_terms

    output = Path(output)
    values = dict(config or {})
    check_engine_settings(values)
    values.setdefault("bf16", torch.cuda.is_available())  # TRL turns bf16 on everywhere; CPUs train in fp32
    # Without use_cpu, accelerate does not treat CPU processes under torchrun as one data-parallel run.
    values.setdefault("use_cpu", not torch.cuda.is_available())
    values.setdefault("report_to", "none")
    values.setdefault("disable_tqdm", not progress)
    values.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    args = NaPOConfig(output_dir=str(output), **values)
    # llava_v1 on a checkpoint of another family than LLaVA-1.5: refused before the run is recorded or a model loads.
    check_checkpoint_prompt_format(model, args.prompt_format)

    state = PartialState()
    if state.is_main_process:
        warn_if_fsdp_on_cpu(args.fsdp, state.device.type)
    settings_now = run_settings(args, model, data)
    if overwrite:
        if state.is_main_process:
            clear_run(output)
        state.wait_for_everyone()
    check_run_record(output, settings_now)  # every process, before any writes the record
    state.wait_for_everyone()
    if state.is_main_process:
        from napo.data.store import write_atomically

        output.mkdir(parents=True, exist_ok=True)
        write_atomically(output / RUN_RECORD, lambda tmp: tmp.write_text(json.dumps(settings_now, indent=2)))
    data = Path(data)
    names = parquet_schema(parquet_files(data)).names  # every file's columns, not only the first's
    terms = resolve_terms(args, names)
    needed = list(dict.fromkeys(["chosen", *(column for _, column in terms.values())]))
    scored_columns(names, needed)  # the RLAIF-V columns are there, before any model is loaded
    from napo.data.prompts import SEQUENCE_VERSION
    from napo.train.collator import reference_columns

    cached = all(name in names for column in needed for name in reference_columns(column))
    settings = cached_settings(data) if cached else None
    if settings is not None and settings.get("max_length") != args.max_length:
        if state.is_main_process:
            print(f"napo train: the cached reference log-probs were truncated at max_length="
                  f"{settings.get('max_length')}, training uses {args.max_length}: scoring them again")  # fmt: skip
        cached = False
    elif settings is not None and settings.get("prompt_format", "template") != args.prompt_format:
        if state.is_main_process:
            print(f"napo train: the cached reference log-probs used prompt_format="
                  f"{settings.get('prompt_format', 'template')}, training uses {args.prompt_format}: "
                  "scoring them again")  # fmt: skip
        cached = False
    elif settings is not None and settings.get("sequences") != SEQUENCE_VERSION:
        if state.is_main_process:
            print(
                "napo train: the cached reference log-probs were scored on the token ids of an earlier napo "
                "(before BOS and </s> on the template path, and LLaVA's own ids on llava_v1): scoring them again"
            )
        cached = False
    if not cached:
        reference_dir = output / REFERENCE_DIR
        device = "cpu" if state.device.type == "cpu" else str(state.device)
        summary = compute_reference_logps(
            model,
            data,
            reference_dir,
            columns=needed,
            batch_size=logps_batch_size,
            max_length=args.max_length,
            prompt_format=args.prompt_format,
            device=device,
            dtype="bfloat16" if args.bf16 else "float32",
            progress=progress and state.is_main_process,
        )
        if summary.failed and state.is_main_process:
            print(f"napo train: {summary.failed} rows could not be scored and are left out (see {reference_dir})")
        gc.collect()  # the reference model: its patched forward is a reference cycle, free it before the policy loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        state.wait_for_everyone()
        data = reference_dir
    dataset = load_dataset("parquet", data_files=parquet_files(data), split="train")

    # Qwen2-VL's processor without its torchvision-only video part where torchvision is missing
    processor = load_processor(model)
    # float32 weights whatever bf16 says: bf16 then means autocast, with AdamW updating float32 weights. Pure
    # bf16 weights would round away nearly every update at the paper's learning rate of 5e-7.
    policy = load_weights(AutoModelForImageTextToText, model, dtype=torch.float32)
    callbacks = [step_table_callback()] if print_table else None
    trainer = NaPOTrainer(
        model=policy, args=args, train_dataset=dataset, processing_class=processor, callbacks=callbacks
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw dict lines: the step table (or nothing) instead
    if state.is_main_process:
        print(f"napo train: training on {engine_summary(trainer)}")
    last = last_complete_checkpoint(output)
    if last is not None and state.is_main_process:
        print(f"napo train: resuming from {last}")
    guard_saves(trainer, output)
    trainer.train(resume_from_checkpoint=None if last is None else str(last))
    try:
        trainer.save_model(str(output))
        trainer.save_state()  # OUTPUT/trainer_state.json: the log history napo analyze --run reads, checkpoints or not
        if state.is_main_process:
            processor.save_pretrained(str(output))
    except Exception as error:
        if not disk_full(error, output):
            raise
        raise DiskFullError(
            f"no space left on device while saving the final model in {output}; free space and rerun the same "
            "command (it resumes from the last checkpoint)"
        ) from error
    state.wait_for_everyone()
    return output
