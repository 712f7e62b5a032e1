"""One NaPOTrainer run under an engine, as a user script would build it; launched by tests/test_scale_out.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/scale_out_worker.py ENGINE MODEL DATA OUTPUT [options]

ENGINE: ``plain`` (one process, or DDP under a launcher), ``zero2``, ``zero3`` or ``fsdp2``. Rank 0 writes
``OUTPUT/run.json``: per step, what the Trainer logged, and how the engine holds the LM head. ``--forbid-logits``
makes the LM head raise if it is ever asked for ``[B, T, V]`` logits; ``--logits`` forces the model's own
logits path (the fallback the fused head replaces).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

ENGINES = ("plain", "zero2", "zero3", "fsdp2")
# The NaPOConfig fields of every run besides its steps, batch, checkpoints and engine (tests/test_scale_out.py hands
# the same to `napo train --config` under each launcher).
TRAINING = {
    "learning_rate": 1e-3,
    "warmup_steps": 0,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "seed": 3,
    "bf16": False,
}


def engine_settings(engine: str) -> dict:
    """The NaPOConfig fields that select an engine, as a user would write them."""
    if engine == "plain":
        return {}
    if engine.startswith("zero"):
        zero = {"stage": int(engine[-1])}
        if engine == "zero3":
            # Partition even the tiny model's small tensors (the default keeps tensors under 1e5 entries whole,
            # which here would be all of them), and gather the shards into one HF model file on save.
            zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
        return {
            "deepspeed": {
                "zero_optimization": zero,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        }
    layers = ["LlamaDecoderLayer", "CLIPEncoderLayer"]  # the tiny LLaVA's blocks: one FSDP unit each
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


class LogitsForbidden(RuntimeError):
    pass


def forbid_logits(model) -> None:
    """The LM head raises if it returns [B, T, V] logits: the fused head must be the one scoring."""
    head = model.get_output_embeddings()
    vocabulary = model.config.get_text_config().vocab_size

    def check(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[-1] == vocabulary:
            raise LogitsForbidden(f"the LM head formed logits of shape {tuple(output.shape)}")

    head.register_forward_hook(check)


def head_layout(trainer) -> str:
    """How the engine holds the LM head weight after training: what the test checks the engine by."""
    weight = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    if type(weight).__name__ == "DTensor":
        return "fsdp2 DTensor"
    if hasattr(weight, "ds_id"):
        return f"zero3 partition of {tuple(weight.ds_shape)}, {weight.numel()} local"
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage} whole"
    return type(trainer.model_wrapped).__name__  # DistributedDataParallel under a launcher


def fsdp_on_cpu_processes() -> None:
    """accelerate (1.15) drops an FSDP plugin when the processes are CPU ones (MULTI_CPU) and runs plain DDP,
    silently. torch's FSDP2 itself runs on CPU with gloo; this lifts that one restriction, so that here the
    Trainer takes its FSDP2 path (fully_shard, FSDP state dicts) as it does on GPUs."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does on GPUs: every later AcceleratorState() copies PartialState's shared state over its
            # own, so the type set above alone would be back to MULTI_CPU by the time the Trainer saves.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--forbid-logits", action="store_true")
    parser.add_argument("--logits", action="store_true")
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from napo.data.store import parquet_files
    from napo.train import lm_head
    from napo.train.trainer import NaPOConfig, NaPOTrainer

    if options.engine == "fsdp2":
        fsdp_on_cpu_processes()
    if options.logits:  # as for a model that scales its logits: the model's own forward, then the token kernel
        lm_head._fused_head_applies = lambda model: False

    dataset = load_dataset("parquet", data_files=parquet_files(Path(options.data)), split="train")
    processor = AutoProcessor.from_pretrained(options.model)
    # Loaded before the config exists, as many scripts do: under ZeRO-3 the policy is then partitioned only when
    # training starts, while the reference model TRL loads from the config is partitioned at once.
    model = AutoModelForImageTextToText.from_pretrained(options.model, dtype=torch.float32)
    args = NaPOConfig(
        output_dir=options.output,
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **TRAINING,
        **engine_settings(options.engine),
    )
    trainer = NaPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if options.forbid_logits:
        forbid_logits(unwrapped)
    resume = None
    if options.resume:
        from napo.train.run import last_complete_checkpoint

        last = last_complete_checkpoint(Path(options.output))
        resume = None if last is None else str(last)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(options.output)  # FSDP2: the Trainer's FULL_STATE_DICT save, gathered to rank 0
    if trainer.is_world_process_zero():
        steps = [entry for entry in trainer.state.log_history if "loss" in entry]
        engine = {"processes": trainer.accelerator.num_processes, "head": head_layout(trainer)}
        Path(options.output, "run.json").write_text(json.dumps({"steps": steps, "engine": engine}))
    trainer.accelerator.wait_for_everyone()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
