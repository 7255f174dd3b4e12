"""`dpolab generate`: the same fixed prompts through several models, side by side, with length statistics.

Prompts come from a file (.jsonl with `prompt` as a string or message list, or .txt one per line) or the
built-in set in prompts.jsonl. The chat template is applied; decoding is greedy or seeded sampling.
Writes generations.jsonl, generations.json (statistics per model) and generations.html (one row per prompt,
one column per model).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError, out_of_memory_error
from dpolab.rundir import (
    GENERATION_STATS,
    GENERATIONS,
    GENERATIONS_HTML,
    RunDir,
    locate_model,
    write_atomic,
    write_json,
    write_jsonl,
)

BUILTIN_PROMPTS = Path(__file__).parent / "prompts.jsonl"


def generate_responses(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "Generating",
) -> list[dict]:
    """Reply to each conversation (templated with `add_generation_prompt=True`).

    Returns one {"reply", "new_tokens", "hit_max"} per conversation; `hit_max` means the reply was cut at
    `max_new_tokens` rather than ended by the model.
    """
    import torch
    from tqdm.auto import tqdm

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    torch.manual_seed(seed)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    replies = []
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc=desc, disable=not progress):
            batch = conversations[start : start + batch_size]
            inputs = tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
            ).to(model.device)
            sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                ended = next((i for i, token in enumerate(row) if token in stop_ids), None)
                tokens = row if ended is None else row[:ended]
                replies.append(
                    {
                        "reply": tokenizer.decode(tokens, skip_special_tokens=True),
                        "new_tokens": len(tokens),
                        "hit_max": ended is None and len(row) >= max_new_tokens,
                    }
                )
    except torch.OutOfMemoryError:
        doing = f"generating {max_new_tokens} tokens for {batch_size} prompts at once"
        at_one = "one prompt at a time does not fit: a smaller --max_new_tokens"
        raise out_of_memory_error(doing, batch_size, at_one) from None
    finally:
        tokenizer.padding_side = padding_side
    return replies


# --- statistics (pure) ------------------------------------------------------------------------------------------


def ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of all texts (1.0 = no n-gram repeats anywhere)."""
    grams = [gram for text in texts for gram in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that repeat an earlier n-gram of the same text (loops score high)."""
    grams = ngrams(text.split(), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def length_stats(rows: list[dict]) -> dict:
    """Per-model statistics over its replies."""
    lengths = [row["new_tokens"] for row in rows]
    replies = [row["reply"] for row in rows]
    return {
        "replies": len(rows),
        "mean_new_tokens": statistics.fmean(lengths),
        "median_new_tokens": statistics.median(lengths),
        "hit_max_share": sum(row["hit_max"] for row in rows) / len(rows),
        "distinct_2": distinct_n(replies, 2),
        "repetition_rate": statistics.fmean(repetition_rate(reply) for reply in replies),
    }


# --- the workflow -----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Decoding:
    """The prompts and decoding settings `dpolab generate` and `dpolab judge` share (judge reuses a run's
    generations only when they were made with the same ones)."""

    prompts: str | None = field(default=None, metadata={"help": "prompts file (.jsonl or .txt); default: 20 built-in"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest answer, in tokens"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate() call (and answers per judge batch)"})
    do_sample: bool = field(default=False, metadata={"help": "sample (seeded) instead of greedy decoding"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (with --do_sample)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (judge: of the first sample)"})


@dataclass(kw_only=True)
class GenerateConfig(Decoding):
    """The same prompts through several models, side by side: generations.jsonl, generations.json (length
    statistics per model) and generations.html."""

    models: str = field(
        metadata={"help": "comma-separated: model dirs, run dirs (their final/), checkpoints, Hub ids, .gguf; "
                          "'base' = the base model of the run the others belong to"}
    )  # fmt: skip
    output_dir: str | None = field(
        default=None, metadata={"help": "default: the run directory of the models, else runs/generate-<time>"}
    )


def run(config: GenerateConfig) -> list[dict]:
    """Generate with each model in turn, then write the rows, the statistics and the side-by-side page."""
    prompts = load_prompts(config.prompts)
    models, run = resolve_models(config.models)
    output = Path(config.output_dir or (run.path if run else f"runs/generate-{time.strftime('%Y%m%d-%H%M%S')}"))
    rows = generate_all(models, prompts, config)
    stats = {label: length_stats([row for row in rows if row["model"] == label]) for label, _ in models}
    write_jsonl(output / GENERATIONS, rows)
    write_json(output / GENERATION_STATS, {"decoding": decoding_record(config), "models": stats})
    write_atomic(output / GENERATIONS_HTML, generations_page(rows, stats, config))
    print(format_stats(stats))
    print(f"written: {output / GENERATIONS}, {output / GENERATIONS_HTML}")
    return rows


def generate_all(models: list[tuple[str, str]], prompts: list[list[dict]], config: GenerateConfig) -> list[dict]:
    """One row per (model, prompt): the reply, its length in new tokens and whether it hit max_new_tokens."""
    from dpolab.models import adapter_base, is_adapter, load_generation_model, load_tokenizer, resolve_model

    rows = []
    for label, model_name in models:
        path = model_name if is_adapter(model_name) else resolve_model(model_name)
        has_tokenizer = Path(path, "tokenizer_config.json").is_file() or not is_adapter(path)
        tokenizer = load_tokenizer(path if has_tokenizer else adapter_base(path))
        if tokenizer.chat_template is None:
            raise DpolabError(f"{label} ({path}) has no chat template; `dpolab generate` needs a chat model.")
        model = load_generation_model(path)
        replies = generate_responses(
            model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
            do_sample=config.do_sample, temperature=config.temperature, seed=config.seed,
            desc=f"Generating ({label})",
        )  # fmt: skip
        for index, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            rows.append({"prompt_index": index, "prompt": prompt, "model": label, **reply})
        del model
    return rows


def decoding_record(config: Decoding) -> dict:
    return {"do_sample": config.do_sample, "temperature": config.temperature if config.do_sample else None,
            "seed": config.seed, "max_new_tokens": config.max_new_tokens}  # fmt: skip


def load_prompts(path: str | None) -> list[list[dict]]:
    """Prompts as message lists: a .txt holds one user prompt per line, a .jsonl a `prompt` per line."""
    source = Path(path) if path else BUILTIN_PROMPTS
    if not source.is_file():
        raise DpolabError(f"Prompts file not found: {source}")
    text = source.read_text(encoding="utf-8")
    if source.suffix == ".txt":
        prompts = [[{"role": "user", "content": line.strip()}] for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DpolabError(f"{source} line {number}: expected a JSON object with a 'prompt'.") from None
            prompts.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    if not prompts:
        raise DpolabError(f"{source}: no prompts.")
    return prompts


def resolve_models(spec: str) -> tuple[list[tuple[str, str]], RunDir | None]:
    """[(label, model path)] from the --models list, and the run they belong to (if they share one)."""
    labels = [label.strip() for label in spec.split(",") if label.strip()]
    located = {label: locate_model(label) for label in labels if label != "base"}
    runs = {run.path for _, run in located.values() if run is not None}
    run = RunDir(next(iter(runs))) if len(runs) == 1 else None
    models = []
    for label in labels:
        if label == "base":
            if run is None:
                raise DpolabError("'base' needs the other --models to be inside one dpolab run directory.")
            models.append(("base", run.base_model()))
        else:
            models.append((label, located[label][0]))
    return models, run


def format_stats(stats: dict) -> str:
    lines = [f"  {'model':<40}{'mean tok':>9}{'median':>8}{'hit max':>9}{'distinct-2':>11}{'repetition':>11}"]
    for label, s in stats.items():
        lines.append(
            f"  {label[-40:]:<40}{s['mean_new_tokens']:>9.1f}{s['median_new_tokens']:>8.1f}{s['hit_max_share']:>9.2f}"
            f"{s['distinct_2']:>11.3f}{s['repetition_rate']:>11.3f}"
        )
    return "\n".join(lines)


def generations_page(rows: list[dict], stats: dict, config: GenerateConfig) -> str:
    from dpolab.render import generation_stats_table, page, side_by_side

    decoding = f"sampling, temperature {config.temperature}, seed {config.seed}" if config.do_sample else "greedy"
    return page(
        "dpolab generations",
        [
            "<h1>Generations</h1>",
            f"<p>{decoding}; max_new_tokens {config.max_new_tokens}; chat template applied.</p>",
            generation_stats_table(stats),
            side_by_side(rows),
        ],
    )
