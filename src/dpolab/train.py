"""`dpolab train`: config -> run directory -> model location -> data -> TRL's DPOTrainer -> final/ + summary.

The run directory (see `rundir.py`) ends up holding config.yaml, metrics.jsonl, TensorBoard events,
checkpoint-N/, final/ and summary.json. An existing run is never overwritten.
"""

from __future__ import annotations

import copy
import errno
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from dpolab.config import TrainConfig, resolved_config
from dpolab.errors import DpolabError
from dpolab.rundir import KEY_METRICS, RunDir, find_resume_checkpoint, write_atomic, write_json

# For "best" in summary.json: whether a higher value is better.
HIGHER_IS_BETTER = {"loss": False, "rewards/accuracies": True, "rewards/margins": True}


def run(config: TrainConfig) -> dict:
    """Train and return the summary written to summary.json.

    Under `accelerate launch` every process runs this; only the main process writes the run directory.
    """
    from accelerate import PartialState

    began = time.time()
    hide_warnings_users_cannot_act_on()
    process = PartialState()  # already set up by DPOConfig; a single process when not launched
    run_dir = RunDir(config.run_dir)
    resume_from = find_resume_checkpoint(run_dir, config.script.resume)
    process.wait_for_everyone()  # every process has checked before the main one creates the directory

    model_path, tokenizer = locate_model(config)
    train_pairs, eval_pairs = load_train_eval(config)
    check_template(train_pairs, tokenizer, config.model.model_name_or_path)
    print(describe_data(train_pairs, eval_pairs), flush=True)
    lengths = check_tokens(config, tokenizer, train_pairs)
    choose_reference_pass(config, len(train_pairs.dataset))
    choose_torch_compile(config)
    fitted = fit_to_memory(config, model_path, lengths, len(train_pairs.dataset))
    choose_reference_batch(config)
    if process.is_main_process:
        record = provenance(config, model_path, train_pairs, eval_pairs) | {"fit_to_memory": fitted}
        start_run_directory(run_dir, config, record, resume_from)
    process.wait_for_everyone()

    trainer = build_trainer_or_clean_up(config, run_dir, model_path, tokenizer, train_pairs, eval_pairs, process)
    if process.is_main_process:
        steps = planned_steps(trainer.args, len(trainer.train_dataset))
        print(describe_training(trainer, steps), flush=True)
        warn_cpu_training(trainer, steps)
        warn_disk_space(trainer, run_dir, steps)
    started = time.time()
    train_output = train_guarded(trainer, run_dir, config, resume_from)
    evaluate_at_end(trainer, run_dir, eval_pairs is not None, config)
    save_final(trainer, run_dir, tokenizer, config, process)
    summary = {}
    if process.is_main_process:
        timing = {"setup_s": started - began, "runtime_s": time.time() - started}
        summary = write_summary(trainer, run_dir, train_output, timing, train_pairs, eval_pairs, fitted)
        print(format_summary(summary), flush=True)
    process.wait_for_everyone()
    return summary


# --- phases -------------------------------------------------------------------------------------------------------


def locate_model(config: TrainConfig) -> tuple[str, object]:
    """Where the model is and its tokenizer, before reading data (a missing model is the first thing to know)."""
    from dpolab.models import load_tokenizer, resolve_model

    model_path = resolve_model(
        config.model.model_name_or_path,
        revision=config.model.model_revision,
        trust_remote_code=config.training.trust_remote_code,
        allow_pickle=config.script.allow_pickle_weights,
    )
    tokenizer = load_tokenizer(
        model_path, revision=config.model.model_revision, trust_remote_code=config.training.trust_remote_code
    )
    return model_path, tokenizer


def load_train_eval(config: TrainConfig):
    """Train pairs and eval pairs (an eval split, a seeded held-out fraction, or None)."""
    from dpolab.data import load_pairs, split_holdout

    script = config.script
    columns = dict(
        dataset_config=script.dataset_config,
        prompt_column=script.prompt_column,
        chosen_column=script.chosen_column,
        rejected_column=script.rejected_column,
        drop_invalid_rows=script.drop_invalid_rows,
    )
    train_pairs = load_pairs(script.dataset_name, script.train_split, **columns)
    if script.eval_split:
        return train_pairs, load_pairs(script.dataset_name, script.eval_split, **columns)
    if script.eval_holdout:
        return split_holdout(train_pairs, script.eval_holdout, config.training.seed)
    return train_pairs, None


def check_template(pairs, tokenizer, model_name: str) -> None:
    """Plain strings given to a chat model skip its template: legal in TRL, and nearly always a mistake."""
    if pairs.is_conversational:
        if tokenizer.chat_template is None:
            raise DpolabError(
                f"The data are message lists ({pairs.format}) but the tokenizer of {model_name} has no chat "
                f"template to render them. Use a chat/instruct model, or give prompt/chosen/rejected as strings."
            )
        return
    if tokenizer.chat_template is not None:
        print_warning(
            f"{model_name} has a chat template, but the data are plain strings ({pairs.format}).\nTRL trains on the "
            "raw text WITHOUT the template, so the model learns on prompts unlike the ones it sees in chat.\nGive "
            "prompt/chosen/rejected as message lists [{role, content}] to have the template applied."
        )


def describe_data(train_pairs, eval_pairs) -> str:
    from dpolab.data import describe_drops

    lines = [f"Data: {train_pairs.format}", f"  train: {len(train_pairs.dataset)} pairs from {train_pairs.source}"]
    if eval_pairs is not None:
        lines.append(f"  eval:  {len(eval_pairs.dataset)} pairs from {eval_pairs.source}")
    for pairs in (train_pairs, eval_pairs):
        lines += [f"  {line}" for line in describe_drops(pairs)] if pairs is not None else []
        if pairs is not None and pairs.identical_rows:
            shown = ", ".join(map(str, pairs.identical_rows[:5])) + (", ..." if len(pairs.identical_rows) > 5 else "")
            lines.append(
                f"  dropped {len(pairs.identical_rows)} pair(s) with chosen == rejected "
                f"from {pairs.source} (rows {shown})"
            )
    return "\n".join(lines)


def check_tokens(config: TrainConfig, tokenizer, train_pairs):
    """Token counts of a sample of 2,000 pairs, before any model loads: answers that tokenize to nothing stop
    the run (`data.check_tokenization`); many answers truncated to nothing are warned."""
    from dpolab.data import check_tokenization, token_lengths

    stats = token_lengths(train_pairs, tokenizer, progress=False, sample=2000)
    name = config.model.model_name_or_path
    for warning in check_tokenization(stats, name, train_pairs.source, config.training.max_length):
        print(warning, file=sys.stderr, flush=True)
    return stats


def choose_reference_pass(config: TrainConfig, train_pairs: int) -> None:
    """Reference log-probs once, before training, when the run sees every pair at least once; a run that sees
    only part of its data (60 smoke steps of 62,135 pairs) computes them in each step instead, as TRL does by
    default. Only when `precompute_ref_log_probs` was not set explicitly."""
    training = config.training
    if "precompute_ref_log_probs" in config.given or training.max_steps <= 0:
        return
    seen = training.max_steps * training.per_device_train_batch_size * training.gradient_accumulation_steps
    seen *= max(training.world_size, 1)
    if seen < train_pairs:
        training.precompute_ref_log_probs = False
        print(f"Reference log-probs: computed in each step (this run sees {seen:,} of {train_pairs:,} pairs; a "
              "pre-pass would score all of them).", flush=True)  # fmt: skip


# The reference pre-pass is a forward without gradients, bound by the host at the training micro-batch: on an H200,
# 32 pairs a batch ran 2.1x the pairs/s of 8 (374 against 175) for 0.3 GiB more (bench/RESULTS.md, 2026-11-27)
REFERENCE_PASS_PAIRS = 32


def choose_reference_batch(config: TrainConfig) -> None:
    """On a CUDA GPU the fast path's reference pre-pass scores REFERENCE_PASS_PAIRS pairs a batch, unless
    `precompute_ref_batch_size` was given (TRL's default: the micro-batch). Its packed row without gradients holds
    one layer's activations at a time, a fraction of a training step's; not where the step needs activation
    checkpointing (little memory to spare), with LoRA, several GPUs (TRL's own pass) or SDPA (a tokens x tokens
    mask: 16x larger at 4x the pairs)."""
    import torch

    from dpolab import packing

    training = config.training
    if "precompute_ref_batch_size" in config.given or not training.precompute_ref_log_probs:
        return
    if not torch.cuda.is_available() or packed_full_fine_tuning_off_reason(config) is not None:
        return
    if attention_implementation(config) not in ("flex_attention", packing.VARLEN_ATTENTION):
        return
    if training.activation_checkpointing or training.per_device_train_batch_size >= REFERENCE_PASS_PAIRS:
        return
    training.precompute_ref_batch_size = REFERENCE_PASS_PAIRS
    print(f"Reference pre-pass: {REFERENCE_PASS_PAIRS} pairs per batch (2x the pairs/s of 8 on an H200; "
          "--precompute_ref_batch_size sets it).", flush=True)  # fmt: skip


def compile_off_reason(config: TrainConfig) -> str | None:
    """Why these settings keep the fast path's default of compiled decoder layers off (None: they take it). Only
    what was measured: full fine-tuning on one GPU, packed rows, FlexAttention (bench/RESULTS.md)."""
    reason = packed_full_fine_tuning_off_reason(config)
    attention = config.model.attn_implementation
    if reason is None and attention not in (None, "flex_attention"):  # None: the fast path takes FlexAttention on CUDA
        reason = f"measured with flex_attention, not {attention}"
    return reason


def packed_full_fine_tuning_off_reason(config: TrainConfig) -> str | None:
    """Why these settings are not the fast path's packed rows in full fine-tuning on one GPU, where its GPU defaults
    (compiled layers, the pre-pass's batch) were measured (None: they are)."""
    training, model = config.training, config.model
    if not config.script.fast_path:
        return "fast_path is off"
    if training.truncation_mode != "keep_start":
        return "the fast path needs truncation_mode keep_start"
    if model.use_peft or model.load_in_4bit or model.load_in_8bit:
        return "not measured with LoRA or quantized weights"
    if training.deepspeed or training.fsdp or training.world_size > 1:
        return "not measured on several GPUs"
    return None


def choose_torch_compile(config: TrainConfig) -> None:
    """On a CUDA GPU the fast path compiles its decoder layers unless `torch_compile` was given: on an H100 that
    was 6.0x TRL's default against ~4x eager, with losses within the bench's 1e-2 of TRL's and 3.4 GiB less
    memory (bench/RESULTS.md). On the CPU compiling costs minutes for a few percent: off."""
    import importlib.util

    import torch

    if "torch_compile" in config.given or not torch.cuda.is_available():
        return
    reason = compile_off_reason(config)
    if reason is None:
        reason = older_gpu_reason(torch.cuda.get_device_capability())
        if reason and config.model.attn_implementation is None:
            reason += ": the fast path takes SDPA with a dense mask"
    if reason is None and importlib.util.find_spec("triton") is None:
        reason = "Triton is not installed"
    if reason is not None:
        print(f"torch_compile: off ({reason}).", flush=True)
        return
    config.training.torch_compile = True
    # transformers names the backend when it parses torch_compile true; set here after that, it is still unset
    config.training.torch_compile_backend = config.training.torch_compile_backend or "inductor"
    print("torch_compile: on, the CUDA fast path's default (--torch_compile false turns it off).", flush=True)


def fit_to_memory(config: TrainConfig, model_path: str, lengths, train_pairs: int) -> dict | None:
    """On a GPU: the micro-batch and activation checkpointing that fit the card (`plan.fit`), keeping the global
    batch, for the largest micro-batch the run is likely to meet (`micro_batch_token_peaks`). Sets them in the config
    and says what it chose."""
    import torch

    from dpolab import packing, plan

    training, script = config.training, config.script
    if not script.fit_to_memory or not torch.cuda.is_available():
        return None
    if training.deepspeed or training.fsdp:
        print("fit_to_memory: skipped (DeepSpeed/FSDP shard the weights and states).")
        return None
    free, _ = torch.cuda.mem_get_info()
    budget = int(script.gpu_memory_gib * plan.GIB) if script.gpu_memory_gib else free
    attention = attention_implementation(config) or "sdpa"  # None: transformers' default, SDPA
    model, shape = plan.model_shape(model_path), plan.run_shape(config, attention)
    tokens_for_batch = micro_batch_token_peaks(config, lengths, train_pairs, attention, shape.compiled)
    chosen = plan.fit(model, shape, budget, tokens_for_batch)
    if chosen is None:
        raise DpolabError(
            f"No micro-batch fits {budget / plan.GIB:.1f} GiB even with activation checkpointing (`dpolab plan` "
            f"shows the components): try use_peft true, a shorter max_length, or fewer pairs per step."
        )
    training.per_device_train_batch_size = chosen.batch
    training.gradient_accumulation_steps = chosen.accumulation
    training.activation_checkpointing = training.gradient_checkpointing = chosen.checkpointing
    estimate = plan.peak_reserved(model, chosen)
    graphs = packing.records_cuda_graphs(training.torch_compile, training.torch_compile_mode)
    print(
        f"fit_to_memory: per_device_train_batch_size {chosen.batch} x gradient_accumulation_steps "
        f"{chosen.accumulation}, activation_checkpointing {str(chosen.checkpointing).lower()} (planned peak "
        f"{estimate / plan.GIB:.1f} of {budget / plan.GIB:.1f} GiB for a micro-batch of {chosen.tokens:,} tokens, "
        "the largest this run is likely to meet"
        f"{'; the CUDA graphs memory pool not counted' if graphs else ''})",
        flush=True,
    )
    return {"per_device_train_batch_size": chosen.batch, "gradient_accumulation_steps": chosen.accumulation,
            "activation_checkpointing": chosen.checkpointing, "planned_peak_gib": round(estimate / plan.GIB, 2),
            "budget_gib": round(budget / plan.GIB, 2), "micro_batch_tokens": chosen.tokens}  # fmt: skip


def micro_batch_token_peaks(config: TrainConfig, lengths, train_pairs: int, attention: str, compiled: bool):
    """batch -> tokens in the largest micro-batch of that many pairs this run is likely to meet (cached): its memory
    peaks in that one micro-batch, which in a whole epoch is well above the typical one (`plan.batch_token_peak`,
    over as many micro-batches as the run draws). Packed rows as the fast path lays them out with `attention`, else
    TRL's padded rows. `fit_to_memory` and `dpolab plan` plan for it."""
    from dpolab import packing, plan

    training = config.training
    packed = config.script.fast_path and training.truncation_mode == "keep_start"
    packed = packed and attention in packing.SUPPORTED_ATTENTION  # else TRL's padded rows (packing.unsupported_reason)
    multiple = packing.row_multiple(compiled, training.torch_compile_mode, training.pad_to_multiple_of)
    pairs_seen = planned_steps(training, train_pairs) * pairs_per_step(training)
    scored = lengths.scored(training.max_length)

    @functools.cache
    def tokens_for_batch(batch: int) -> int:
        micro_batches = -(-pairs_seen // batch)
        return plan.batch_token_peak(scored, batch, packed, micro_batches=micro_batches, row_multiple=multiple)

    return tokens_for_batch


def provenance(config: TrainConfig, model_path: str, train_pairs, eval_pairs) -> dict:
    from dpolab.versions import git_commit, installed_versions

    return {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": invoked_command(),
        "config_source": config.source,
        "model_path": model_path,
        "data": {"train": train_pairs.source, "eval": eval_pairs.source if eval_pairs else None},
        "data_format": train_pairs.format,
        "data_quality": {
            name: pairs.drop_report() for name, pairs in (("train", train_pairs), ("eval", eval_pairs)) if pairs
        },
        "versions": installed_versions(),
        "git_commit": git_commit(),
    }


def start_run_directory(run_dir: RunDir, config: TrainConfig, provenance: dict, resume_from: str | None) -> None:
    """Create (or reopen, when resuming) the run directory and write its resolved config.yaml."""
    run_dir.path.mkdir(parents=True, exist_ok=config.script.resume)
    write_atomic(run_dir.config_file, yaml.safe_dump(resolved_config(config, provenance), sort_keys=False))
    if "tensorboard" in config.training.report_to and not resume_from:
        write_tensorboard_layout(run_dir)
    if resume_from:
        from dpolab.rundir import checkpoint_step

        run_dir.truncate_metrics(checkpoint_step(resume_from))
        print(f"Resuming {run_dir.path} from {Path(resume_from).name}", flush=True)


def write_tensorboard_layout(run_dir: RunDir) -> None:
    """The charts of TensorBoard's Custom Scalars tab (`rundir.TENSORBOARD_LAYOUT`), in an event file of their own."""
    from torch.utils.tensorboard import SummaryWriter

    from dpolab.rundir import TENSORBOARD_LAYOUT

    # each metric as an anchored pattern: the tab matches regular expressions, and train/loss is also in train/loss_x
    layout = {section: {chart: ["Multiline", [f"^{name}$" for name in names]] for chart, names in charts.items()}
              for section, charts in TENSORBOARD_LAYOUT.items()}  # fmt: skip
    with SummaryWriter(str(run_dir.tensorboard_dir), filename_suffix=".layout") as writer:
        writer.add_custom_scalars(layout)


def build_trainer_or_clean_up(config, run_dir: RunDir, model_path, tokenizer, train_pairs, eval_pairs, process):
    try:
        return build_trainer(config, model_path, tokenizer, train_pairs, eval_pairs)
    except Exception as error:
        compiling = is_compile_failure(error)  # the reference pre-pass ran the compiled layers
        if not (compiling or isinstance(error, DpolabError)):
            raise
        if not config.script.resume and process.is_main_process:  # a run that never started leaves nothing
            shutil.rmtree(run_dir.path, ignore_errors=True)
        if compiling:
            message = compile_failed_message(error, config, lambda setting: f"the same command plus {setting}")
            raise DpolabError(message) from None
        raise


def build_trainer(config: TrainConfig, model_path: str, tokenizer, train_pairs, eval_pairs):
    """TRL's DPOTrainer as `trl/scripts/dpo.py` builds it, on the fast path where it applies, with dpolab's
    callbacks."""
    from transformers import ProgressCallback
    from trl import DPOTrainer, get_peft_config

    from dpolab import models, packing
    from dpolab.callbacks import (
        GradientsAllocatedCallback,
        LiveProgressCallback,
        MetricsFileCallback,
        WeightMovementCallback,
    )
    from dpolab.models import score_completion_tokens_only

    training = config.training
    # transformers' TensorBoard callback would nest events under output_dir/runs/<date>; keep them in one place.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(RunDir(config.run_dir).tensorboard_dir)
    model = load_policy(config, model_path)
    warn_lost_updates(model, config)
    pad_token_id = models.pad_token_id(tokenizer)
    collator, trainer_args = None, training
    attention = model.config._attn_implementation
    reason = packing.fast_path_off_reason(model.config, config.script.fast_path, training.truncation_mode)
    if config.script.fast_path:
        if reason is None:
            packing.install(model)
            collator = packing.PackedCollator(
                pad_token_id=pad_token_id, max_length=training.max_length,
                row_multiple=packing.row_multiple(
                    training.torch_compile, training.torch_compile_mode, training.pad_to_multiple_of
                ),
                varlen=attention == packing.VARLEN_ATTENTION,
                fixed_shapes=packing.records_cuda_graphs(training.torch_compile, training.torch_compile_mode),
            )  # fmt: skip
            print(f"Fast path: pairs packed with their prompt shared ({attention} attention)")
            if training.torch_compile:
                trainer_args = compile_fast_path(model, training)
        else:
            print(f"Fast path off: {reason}.")
            if training.torch_compile and "torch_compile" not in config.given:  # the default was the fast path's
                trainer_args = copy.copy(training)
                trainer_args.torch_compile = False
                print("torch_compile: off (the fast path's default, and the fast path is off).")
    dpolab_compiles = collator is not None and trainer_args is not training  # compile_fast_path took the compile
    arguments = dict(
        model=model,
        args=trainer_args,
        data_collator=collator,
        train_dataset=train_pairs.dataset,
        eval_dataset=eval_pairs.dataset if eval_pairs is not None else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(config.model),
        callbacks=[WeightMovementCallback(), MetricsFileCallback(RunDir(config.run_dir).metrics_file)],
    )
    if training.precompute_ref_log_probs:
        precision = {
            "dtype": config.model.dtype,
            "bf16": training.bf16,
            "fp16": training.fp16,
            "ld_alpha": training.ld_alpha,
        }
        with score_completion_tokens_only():  # the reference pre-pass runs inside the constructor
            trainer = packing.reference_trainer_class()(**arguments, reference_path=model_path, precision=precision)
    else:
        trainer = DPOTrainer(**arguments)
        if collator is not None and trainer.ref_model is not None:  # TRL loaded its own reference copy
            reference = trainer.accelerator.unwrap_model(trainer.ref_model)
            packing.install(reference)
            if dpolab_compiles:  # the policy's layers or backbone: the reference's layers too
                mode = training.torch_compile_mode  # no CUDA graphs per layer (packing.compile_backbone says why)
                packing.compile_layers(reference, training.torch_compile_backend,
                                       None if mode in packing.CUDA_GRAPH_MODES else mode)  # fmt: skip
    if collator is not None and (reason := packing.install_answer_head(trainer)) is not None:
        print(f"Fast path: TRL's LM head, with its waits for the GPU ({reason}).")
    if packing.records_cuda_graphs(dpolab_compiles, training.torch_compile_mode):
        packing.compile_backbone(model, training.torch_compile_backend, training.torch_compile_mode)
        if training.gradient_accumulation_steps > 1:
            trainer.add_callback(GradientsAllocatedCallback())
            print("torch_compile: gradients allocated before each step's backward passes (CUDA graphs and gradient "
                  "accumulation, pytorch/pytorch#169545).", flush=True)  # fmt: skip
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # sharded weights: no per-tensor sample
        trainer.remove_callback(WeightMovementCallback)
    for callback in list(trainer.callback_handler.callbacks):  # TensorBoard etc. log after the weight metrics
        if type(callback).__module__.startswith("transformers.integrations"):
            trainer.add_callback(trainer.pop_callback(callback))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LiveProgressCallback())
    for name, pairs, prepared in (
        ("train", train_pairs, trainer.train_dataset),
        ("eval", eval_pairs, trainer.eval_dataset),
    ):
        if pairs is not None:
            check_dropped(name, len(pairs.dataset), len(prepared), training.max_length)
    return trainer


def compile_fast_path(model, training):
    """TRL's `torch_compile` on the fast path, in place and without accelerate's whole-model compile: each decoder
    layer now (`packing.compile_layers` says why), or under the CUDA-graph modes the whole backbone once the
    reference pre-pass is done (`packing.compile_backbone`, called by build_trainer). Returns the training
    arguments the trainer gets."""
    from dpolab import packing

    if training.distributed_state.distributed_type in ("DEEPSPEED", "FSDP"):  # accelerate compiles after sharding
        print("torch_compile: left to accelerate (sharded weights are compiled after they are wrapped)")
        return training
    backend, mode = training.torch_compile_backend, training.torch_compile_mode
    if mode in packing.CUDA_GRAPH_MODES:
        import torch._inductor.config

        multiple = packing.row_multiple(True, mode, training.pad_to_multiple_of)
        pairs_per_row = max(training.per_device_train_batch_size, training.per_device_eval_batch_size)
        lengths = packing.row_lengths_at_most(pairs_per_row, training.max_length, multiple)
        triton = torch._inductor.config.triton
        limit = triton.cudagraph_dynamic_shape_warn_limit  # PyTorch warns past 8 recordings, asking for padding
        if lengths is not None and limit is not None:  # to a few shapes, which the rounding does: warn past those
            triton.cudagraph_dynamic_shape_warn_limit = max(lengths, limit)
        # inductor's mix-order reduction (fusing RMSNorm's two backward reductions) guards on the row's size: on an
        # H200 a row past 5,851 tokens (896 x tokens >= 5 Mi) compiled the whole backbone again, minutes into the
        # run; without it one graph serves every row length
        triton.mix_order_reduction = False
        bound = "" if lengths is None else f": at most {lengths} length" + "s" * (lengths != 1)
        print(f"torch_compile: mode {mode}: the whole backbone compiled in place as one graph ({backend}, dynamic "
              "shapes, one decoder layer traced for all; the first step takes a minute or more, the first evaluation "
              "too) after the reference pre-pass, one CUDA graph recorded per row length (rows rounded to "
              f"{multiple} tokens{bound}). Its speed is not yet measured; leaving torch_compile_mode unset compiles "
              "each layer (6x TRL's default on an H100 and an H200, bench/RESULTS.md).", flush=True)  # fmt: skip
    else:
        layers = packing.compile_layers(model, backend, mode)
        print(f"torch_compile: {layers} decoder layers compiled in place ({backend}, mode {mode or 'default'}, "
              "dynamic shapes); compiling takes the first steps")  # fmt: skip
    trainer_args = copy.copy(training)
    trainer_args.torch_compile, trainer_args.torch_compile_backend, trainer_args.torch_compile_mode = False, None, None
    return trainer_args


def warn_lost_updates(model, config: TrainConfig) -> None:
    """bf16/fp16 weights with a plain optimizer at a learning rate their precision cannot hold: say so, with
    how many updates round away (computed from the weights) and what to set instead."""
    from dpolab.weights import COMPENSATED_OPTIMIZERS, lost_update_warning, lost_updates

    training = config.training
    optim = getattr(training.optim, "value", training.optim)  # TrainingArguments holds an enum
    if config.model.use_peft or optim in COMPENSATED_OPTIMIZERS:
        return  # LoRA adapters are kept in float32 by peft; compensated optimizers keep the low bits
    lost = lost_updates(model.parameters(), training.learning_rate)
    if lost is not None and lost.share > 0.1:
        print_warning(lost_update_warning(lost, training.learning_rate, optim))


def pairs_per_step(args) -> int:
    """The global batch: micro-batch x accumulation x processes."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


def planned_steps(args, train_pairs: int) -> int:
    """The optimizer steps the Trainer will take: max_steps, else whole epochs of global batches (the last one
    short, as the Trainer's dataloader keeps it)."""
    epoch_steps = -(-train_pairs // pairs_per_step(args))
    return args.max_steps if args.max_steps > 0 else epoch_steps * math.ceil(args.num_train_epochs)


def describe_training(trainer, steps: int) -> str:
    """The run in one line, before its first step (`steps`: `planned_steps`): pairs per step and how they split,
    the share of the data, and the settings that shape the curves."""
    args, pairs = trainer.args, len(trainer.train_dataset)
    processes, per_step = max(args.world_size, 1), pairs_per_step(args)
    split = f"{args.per_device_train_batch_size} per micro-batch x accumulation {args.gradient_accumulation_steps}"
    split += f" x {processes} processes" if processes > 1 else ""
    saves = {"steps": f"a checkpoint every {args.save_steps:g} steps", "epoch": "a checkpoint every epoch",
             "best": f"a checkpoint at each best {args.metric_for_best_model}"}  # fmt: skip
    saves = saves.get(getattr(args.save_strategy, "value", args.save_strategy), "no checkpoints")
    epochs = steps * per_step / pairs if args.max_steps > 0 else args.num_train_epochs
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # TrainingArguments: an enum
    return (
        f"Training on {device_name(args.device)}: {steps:,} steps x {per_step} pairs ({split}) = {epochs:.2f} epochs "
        f"of {pairs:,} pairs; learning_rate {args.learning_rate:g} ({scheduler}), beta {args.beta:g}, loss_type "
        f"{'+'.join(args.loss_type)}, max_length {args.max_length}; {saves}"
    )


def device_name(device) -> str:
    """'the CPU', or the GPU's own name."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "the CPU" if device.type == "cpu" else str(device)


def warn_cpu_training(trainer, steps: int) -> None:
    """A real model for many steps on the CPU is nearly always a GPU torch cannot see: said before it starts."""
    import torch

    parameters = sum(parameter.numel() for parameter in trainer.model.parameters())
    text = cpu_training_warning(trainer.args.device.type, parameters, steps, torch.__version__)
    if text:
        print_warning(text)


def cpu_training_warning(device_type: str, parameters: int, steps: int, torch_version: str) -> str | None:
    """The warning for `parameters` trained `steps` steps on `device_type`, or None: from 100M parameters and 200
    steps on the CPU (the demo's 135M model trains 20)."""
    if device_type != "cpu" or parameters < 100e6 or steps < 200:
        return None
    build = " (a CPU-only build)" if "+cpu" in torch_version else ""
    return (
        f"this run trains {parameters / 1e6:.0f}M parameters for {steps:,} steps on the CPU: expect days, not hours. "
        f"torch {torch_version}{build} sees no GPU; if this machine has one, `dpolab doctor` says why."
    )


def warn_disk_space(trainer, run_dir: RunDir, steps: int) -> None:
    """A run whose checkpoints will not fit the disk under its run directory is told so before its first step."""
    args = trainer.args
    weights = trainable = 0
    for parameter in trainer.model.parameters():
        size = parameter.numel() * parameter.element_size()
        weights += size
        trainable += size if parameter.requires_grad else 0
    saved = trainable if hasattr(trainer.model, "peft_config") else weights  # LoRA saves the adapter alone
    needed = disk_space_needed(saved, trainable, args, steps)
    free = shutil.disk_usage(run_dir.path).free
    if needed > free:
        print_warning(
            f"{free / 2**30:.1f} GiB free under {run_dir.path}, and this run's checkpoints and final/ need about "
            f"{needed / 2**30:.1f} GiB (weights and optimizer states, save_total_limit {args.save_total_limit}). Free "
            "space, keep fewer checkpoints (--save_total_limit) or save less often (--save_steps), or set --runs_dir "
            "on a larger disk."
        )


def disk_space_needed(saved_bytes: int, trainable_bytes: int, args, steps: int) -> int:
    """Bytes a run's saves take at their peak: each checkpoint holds the saved weights and AdamW's two states of
    the trainable ones (in their dtype); the Trainer writes a new checkpoint before it deletes the oldest (one more
    than save_total_limit); final/ holds the weights once more."""
    checkpoints = 0
    if args.save_strategy == "steps" and args.save_steps:
        checkpoints = steps // int(args.save_steps) if args.save_steps >= 1 else round(1 / args.save_steps)
    elif args.save_strategy in ("epoch", "best"):
        checkpoints = max(math.ceil(args.num_train_epochs), 1)
    if args.save_total_limit:
        checkpoints = min(checkpoints, args.save_total_limit + 1)
    return checkpoints * (saved_bytes + 2 * trainable_bytes) + saved_bytes


def load_policy(config: TrainConfig, model_path: str):
    """The model to train, loaded as TRL's DPOTrainer would load it from `model_path` (TRL's own loader)."""
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from dpolab import packing

    model_args, training = config.model, config.training
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=attention_implementation(config),
        dtype=model_args.dtype,
    )
    kwargs.update(training.model_init_kwargs or {})
    packing.register_attention(kwargs["attn_implementation"])
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if training.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):  # as TRL: "auto" fails there
        kwargs["device_map"] = None
    return create_model_from_path(model_path, **kwargs)


def attention_implementation(config: TrainConfig) -> str | None:
    """The attention the policy loads with: as set, else FlexAttention for the fast path on a CUDA GPU of compute
    capability 8.0 or more (it skips the masked blocks of a packed row, bench/RESULTS.md), else transformers'
    default (None: SDPA, which takes the packed row's dense mask)."""
    import torch

    attention = config.model.attn_implementation
    if attention is None and config.script.fast_path and torch.cuda.is_available():
        return "flex_attention" if older_gpu_reason(torch.cuda.get_device_capability()) is None else None
    return attention


# FlexAttention and compiled layers were measured on an H100 (compute capability 9.0). Cards below 8.0 (T4, V100)
# have no bf16, so their attention runs in float32, for which PyTorch's FlexAttention kernels take their smallest
# backward tiles (16 x 16, torch/_inductor/template_heuristics/triton.py), and FlexAttention has failed on T4s in
# other trainers (unsloth PRs #4302, #8137). There the fast path takes SDPA with a dense mask, uncompiled.
FLEX_ATTENTION_MIN_CAPABILITY = (8, 0)


def older_gpu_reason(capability: tuple[int, int]) -> str | None:
    """Why a CUDA GPU of this compute capability gets neither FlexAttention nor compiled layers by default (None:
    it gets both)."""
    if tuple(capability) >= FLEX_ATTENTION_MIN_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"this GPU's compute capability {major}.{minor} is below 8.0 (no bf16; FlexAttention and compiled layers "
        "were measured on 9.0 and are taken from 8.0 up)"
    )


def check_dropped(name: str, given: int, kept: int, max_length: int | None) -> None:
    """TRL silently drops pairs whose prompt alone reaches max_length; all of them dropped is an error."""
    if kept == 0:
        raise DpolabError(
            f"All {given} {name} pairs were dropped: in every one the prompt alone reaches max_length={max_length} "
            f"tokens, leaving no completion to learn from. Raise --max_length (`dpolab data check` shows the lengths)."
        )
    if kept < given:
        print(f"Note: TRL dropped {given - kept} of {given} {name} pairs (prompt alone >= max_length={max_length}).")


def train_guarded(trainer, run_dir: RunDir, config: TrainConfig, resume_from: str | None):
    """trainer.train() under the run guard: a non-finite value or Ctrl-C ends it as a clear message."""
    import torch

    from dpolab.callbacks import RunGuard, weights_finite
    from dpolab.models import score_completion_tokens_only

    guard = RunGuard(step_was_skipped=lambda: trainer.accelerator.optimizer_step_was_skipped)
    trainer.add_callback(guard)
    with guard.catching_ctrl_c(), score_completion_tokens_only():
        try:
            train_output = trainer.train(resume_from_checkpoint=resume_from)
        except torch.OutOfMemoryError as error:
            in_evaluation = ran_in_evaluation(error)
            raise DpolabError(out_of_memory_message(trainer, run_dir, config, in_evaluation)) from None
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise DpolabError(disk_full_message(trainer, run_dir, config)) from None
        except Exception as error:
            if not is_compile_failure(error):
                raise
            last = run_dir.last_complete_checkpoint()

            def then(setting: str) -> str:
                if last:
                    return f"resume from {last} with the same command plus --resume {setting}"
                return f"no checkpoint was saved yet: start again with another --run_name and {setting}"

            raise DpolabError(compile_failed_message(error, config, then)) from None
    if guard.non_finite is None and not weights_finite(trainer.model):  # checked before final/ is written
        guard.non_finite = (trainer.state.global_step, "weights", float("nan"))
    if guard.skipped_steps:
        print(f"fp16 loss scaler: {guard.skipped_steps} overflow step(s) skipped (routine).", flush=True)
    if guard.non_finite is not None:
        raise DpolabError(non_finite_message(guard.non_finite, run_dir, config.training.learning_rate))
    if guard.interrupted:
        print(
            f"\nInterrupted at step {trainer.state.global_step}; checkpoint saved: "
            f"{run_dir.last_complete_checkpoint()}.\nResume with: {invoked_command() or 'the same command'}"
            + ("" if config.script.resume else " --resume"),
            file=sys.stderr,
            flush=True,
        )
        raise KeyboardInterrupt
    return train_output


def evaluate_at_end(trainer, run_dir: RunDir, has_eval_data: bool, config: TrainConfig) -> None:
    """As TRL: evaluation follows eval_strategy; a run that evaluates gets a last evaluation at its final step."""
    import torch

    from dpolab.models import score_completion_tokens_only

    last_step = trainer.state.global_step
    if (
        has_eval_data
        and config.training.eval_strategy != "no"
        and not evaluated_at(trainer.state.log_history, last_step)
    ):
        with score_completion_tokens_only():
            try:
                trainer.evaluate()
            except torch.OutOfMemoryError:
                raise DpolabError(out_of_memory_message(trainer, run_dir, config, in_evaluation=True)) from None


def save_final(trainer, run_dir: RunDir, tokenizer, config: TrainConfig, process) -> None:
    """final/: the model (or adapter, and optionally the merged model) and tokenizer, as safetensors only."""
    final_dir = run_dir.final_dir
    trainer.save_model(str(final_dir))  # every process takes part (sharded models); the main one writes
    if process.is_main_process:
        tokenizer.save_pretrained(str(final_dir))
        # Trainer pickles its arguments beside the weights; config.yaml records them, and final/ stays pickle-free.
        (final_dir / "training_args.bin").unlink(missing_ok=True)
        if config.script.merge_lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(str(final_dir / "merged"))
            tokenizer.save_pretrained(str(final_dir / "merged"))


def write_summary(trainer, run_dir: RunDir, train_output, timing: dict, train_pairs, eval_pairs, fitted) -> dict:
    """summary.json; `timing`: setup_s (data, model, reference pre-pass) and runtime_s (training, final eval, save);
    on a GPU its peak memory beside what `fit_to_memory` planned (`fitted`), so every run checks the plan."""
    import torch

    from dpolab.diagnostics import diagnose_run

    records = run_dir.read_metrics()
    summary = summarize(
        records,
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        train_metrics=train_output.metrics,
        **timing,
    )
    summary.update(
        run_dir=str(run_dir.path),
        final_model=str(run_dir.final_dir),
        checkpoints=[p.name for p in run_dir.checkpoints()],
        train_pairs=len(train_pairs.dataset),
        eval_pairs=len(eval_pairs.dataset) if eval_pairs else 0,
        answer_tokens=answer_tokens(trainer.train_dataset, trainer.args.max_length),
    )
    if torch.cuda.is_available():
        summary["gpu_memory_gib"] = {
            "peak_reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "planned": (fitted or {}).get("planned_peak_gib"),
        }
    findings = diagnose_run(records, run_dir.read_config(), summary)
    summary["diagnostics"] = [finding.as_dict() for finding in findings]
    write_json(run_dir.summary_file, summary)
    return summary


def answer_tokens(dataset, max_length: int | None) -> dict:
    """Mean scored tokens per chosen and rejected answer after truncation (for per-token diagnostics)."""
    from dpolab.packing import truncated_answers

    totals, count = {"chosen": 0, "rejected": 0}, 0
    for example in dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]):
        chosen, rejected = truncated_answers(example, max_length)
        totals["chosen"] += len(chosen)
        totals["rejected"] += len(rejected)
        count += 1
    return {side: total / count for side, total in totals.items()} if count else {}


# --- helpers ------------------------------------------------------------------------------------------------------


def print_warning(text: str) -> None:
    """A warning the user must not miss, between two rules of '!' on stderr."""
    print("\n" + "!" * 100 + f"\nWARNING: {text}\n" + "!" * 100 + "\n", file=sys.stderr, flush=True)


def hide_warnings_users_cannot_act_on() -> None:
    """TRL 1.16 calls transformers 5's renamed gradient-checkpointing methods in every run: three deprecation
    warnings for TRL to act on, not the user."""
    import warnings

    deprecated = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)


def invoked_command() -> str | None:
    """The `dpolab ...` command line this process runs, when it was started from the CLI."""
    return " ".join(["dpolab", *sys.argv[1:]]) if sys.argv and "dpolab" in sys.argv[0] else None


def non_finite_message(non_finite: tuple[int, str, float], run_dir: RunDir, learning_rate: float) -> str:
    step, key, value = non_finite
    last = run_dir.last_complete_checkpoint()
    where = (
        f"The last good checkpoint is {last}: continue from it with --resume and a lower --learning_rate "
        f"(e.g. {learning_rate / 10:g})."
        if last
        else "No checkpoint was saved before it; start a new run (another --run_name)."
    )
    return (
        f"Training stopped at step {step}: {key} is {value}. Nothing was saved as final/. {where} "
        f"Also worth trying: max_grad_norm 1.0, warmup_steps 0.1, bf16 rather than fp16, and `dpolab data check` "
        f"for extreme lengths."
    )


def out_of_memory_message(trainer, run_dir: RunDir, config: TrainConfig, in_evaluation: bool = False) -> str:
    """What ran out, a setting with half the memory for activations (same global batch), and where to resume.
    Under the CUDA-graph modes first the mode unset: its graphs' memory pool is what `plan` does not count. In an
    evaluation between steps: a smaller eval batch."""
    from dpolab.packing import records_cuda_graphs

    training = trainer.args
    batch, accumulation = training.per_device_train_batch_size, training.gradient_accumulation_steps
    advice = "A setting that needs about half the activation memory, same global batch"
    # trainer.args no longer has the mode (dpolab compiles): the run's settings do
    if in_evaluation:
        eval_batch = training.per_device_eval_batch_size
        advice = f"It ran out in an evaluation ({eval_batch} pairs per eval batch); smaller eval batches"
        setting = (f"--per_device_eval_batch_size {eval_batch // 2}" if eval_batch > 1
                   else "--eval_strategy no (and `dpolab sweep` the checkpoints afterwards)")  # fmt: skip
    elif records_cuda_graphs(config.training.torch_compile, config.training.torch_compile_mode):
        advice = ("The CUDA graphs of torch_compile_mode keep a memory pool of their own, which the plan does not "
                  "count; without them (the layers compiled one by one)")  # fmt: skip
        setting = "without torch_compile_mode (drop the flag or the YAML key)"
    else:
        if batch > 1:
            smaller = batch // 2 if batch % 2 == 0 else 1
            setting = (f"--per_device_train_batch_size {smaller} --gradient_accumulation_steps "
                       f"{batch * accumulation // smaller}")  # fmt: skip
        elif not training.activation_checkpointing:
            setting = "--activation_checkpointing true"
        else:
            setting = "--use_peft true (or a shorter --max_length)"
        if config.script.fit_to_memory and not (training.deepspeed or training.fsdp):
            setting += " --fit_to_memory false"  # else it chooses again what ran out: its plan missed this batch
    last = run_dir.last_complete_checkpoint()
    resume = (
        f"then resume from {last} with the same command plus --resume, {setting}"
        if last
        else "no checkpoint was saved yet: start again with another --run_name"
    )
    return (
        f"CUDA ran out of memory at step {trainer.state.global_step} (micro-batch {batch} x accumulation "
        f"{accumulation}, activation checkpointing {str(bool(training.activation_checkpointing)).lower()}). "
        f"{advice}: {setting}; {resume}. `dpolab plan "
        f"--config {run_dir.config_file} --gpu_memory_gib N` shows the components."
    )


def disk_full_message(trainer, run_dir: RunDir, config: TrainConfig) -> str:
    """The disk filled while saving: where, what a checkpoint takes, and how to go on (a checkpoint cut short by
    the full disk is skipped by --resume)."""
    last = run_dir.last_complete_checkpoint()
    keep = config.training.save_total_limit
    then = f"then resume from {last} with the same command plus --resume" if last else "then start again"
    return (
        f"The disk under {run_dir.path} is full (at step {trainer.state.global_step}, saving). Each checkpoint holds "
        f"the weights and the optimizer states; free space or keep fewer of them (--save_total_limit "
        f"{max((keep or 3) - 1, 1)}), {then}. `dpolab doctor` shows the free space."
    )


def ran_in_evaluation(error: BaseException) -> bool:
    """Whether the error was raised in an evaluation inside training (transformers' evaluation loop)."""
    import traceback

    return any(frame.name == "evaluation_loop" for frame in traceback.extract_tb(error.__traceback__))


def is_compile_failure(error: BaseException) -> bool:
    """Inductor, Triton or the C compiler failed: dynamo raises that as BackendCompilerFailed (inductor's
    InductorError is one); a Triton kernel with no configuration that fits the GPU can also fail when it is first
    launched, as a RuntimeError (torch/_inductor/runtime/triton_heuristics.py)."""
    from torch._dynamo.exc import BackendCompilerFailed

    no_config = isinstance(error, RuntimeError) and str(error).startswith("No valid triton configs")
    return isinstance(error, BackendCompilerFailed) or no_config


def compile_failed_message(error, config: TrainConfig, then) -> str:
    """What failed to compile (inductor, Triton or the C compiler) and the setting that trains without it: `then(
    setting)` says how to run with it. FlexAttention's kernels are compiled even without torch_compile
    (transformers compiles them) and are the kernels that need the most shared memory (its backward: more than
    24 GB cards such as the RTX 4090 or A10G have per block, pytorch/pytorch#133254): SDPA does without them."""
    inner = getattr(error, "inner_exception", None) or error  # torch's wrapper names the backend, the inner the cause
    cause = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:300]}{raised_at(inner)}"
    text = str(error).lower()
    flex_kernel = any(sign in text for sign in ("flex_attention", "out of resource", "shared memory", "triton config"))
    if attention_implementation(config) == "flex_attention" and (flex_kernel or not config.training.torch_compile):
        return (f"FlexAttention (the fast path's attention on a GPU) could not be compiled for this GPU: {cause}\n"
                "Train with SDPA attention instead (a dense mask: the same numbers, more attention work): "
                f"{then('--attn_implementation sdpa')}.")  # fmt: skip
    chosen = "as set" if "torch_compile" in config.given else "on by default for the CUDA fast path"
    chosen += f", backend {config.training.torch_compile_backend}"
    return (f"torch_compile ({chosen}) could not compile the model: {cause}\nTrain without it: "
            f"{then('--torch_compile false')}. `dpolab doctor` checks what compiling needs (Triton on a GPU, a C++ "
            "compiler on the CPU).")  # fmt: skip


def raised_at(error: BaseException) -> str:
    """Where an error was raised (its innermost frame), for a one-line message that drops the traceback: a failure
    inside torch names the step that failed, a bug report can start from it."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    path = frames[-1].filename.split("site-packages/")[-1]
    return f" (raised in {path}:{frames[-1].lineno}, {frames[-1].name})"


def evaluated_at(log_history: list[dict], step: int) -> bool:
    return any("eval_loss" in record and record.get("step") == step for record in log_history)


def summarize(
    records: list[dict], *, steps: int, epochs: float, setup_s: float, runtime_s: float, train_metrics: dict
) -> dict:
    """summary.json from the metric records: last and best values of the key curves, train and eval."""
    from dpolab.logps import is_finite

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    final = {key: train[-1][key] for key in KEY_METRICS if train and key in train[-1]}
    moved = [r for r in records if "weights/changed_share" in r]
    final_eval = {key: evals[-1][f"eval_{key}"] for key in KEY_METRICS if evals and f"eval_{key}" in evals[-1]}
    best = {}
    for prefix, series in (("", train), ("eval_", evals)):
        for key, higher in HIGHER_IS_BETTER.items():
            values = [(r[prefix + key], r["step"]) for r in series if is_finite(r.get(prefix + key))]
            if values:
                value, step = (max if higher else min)(values, key=lambda pair: pair[0])
                best[prefix + key] = {"value": value, "step": step}
    return {
        "steps": steps,
        "epochs": epochs,
        "setup_s": round(setup_s, 1),
        "runtime_s": round(runtime_s, 1),
        "pairs_per_s": train_metrics.get("train_samples_per_second"),  # Trainer's: the training loop only
        "steps_per_s": train_metrics.get("train_steps_per_second"),
        "final": final,
        "final_eval": final_eval,
        "best": best,
        "weights": {key: moved[-1][key] for key in ("weights/changed_share", "weights/relative_change")}
        if moved
        else None,
    }


def format_summary(summary: dict) -> str:
    import textwrap

    from dpolab.diagnostics import finding_text

    rows = [
        f"Run finished: {summary['run_dir']}",
        f"  set-up {summary['setup_s']:.0f} s (data, model, reference pre-pass); {summary['steps']} steps, "
        f"{summary['epochs']:.2f} epochs in {summary['runtime_s']:.0f} s"
        + (f" ({summary['pairs_per_s']:.2f} pairs/s while training)" if summary.get("pairs_per_s") else ""),
        f"  {'metric':<22}{'train (last)':>14}{'eval (last)':>14}",
    ]
    for key in KEY_METRICS:
        train = summary["final"].get(key)
        evaluated = summary["final_eval"].get(key)
        rows.append(f"  {key:<22}{_fmt(train):>14}{_fmt(evaluated):>14}")
    weights = summary.get("weights")
    if weights:
        rows.append(
            f"  weights: {weights['weights/changed_share']:.1%} of sampled weights changed, relative change "
            f"{weights['weights/relative_change']:.2g}"
        )
    memory = summary.get("gpu_memory_gib")
    if memory:
        planned = f"; fit_to_memory planned {memory['planned']:.2f}" if memory.get("planned") is not None else ""
        rows.append(f"  GPU memory: peak {memory['peak_reserved']:.2f} GiB reserved ({memory['peak_allocated']:.2f} "
                    f"allocated{planned})")  # fmt: skip
    for finding in summary.get("diagnostics", []):
        rows.append(textwrap.indent(finding_text(finding), "  "))
    rows.append(f"  model: {summary['final_model']}  (AutoModelForCausalLM.from_pretrained)")
    rows.append(f"  curves: tensorboard --logdir {Path(summary['run_dir']) / 'tensorboard'} (its Custom Scalars tab: "
                "train and eval on one chart)  |  metrics.jsonl  |  dpolab report")  # fmt: skip
    return "\n".join(rows)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
