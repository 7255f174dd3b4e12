"""`dpolab generate`: the same fixed prompts through several models, side by side, with length statistics.

Prompts come from a file (.jsonl with `prompt` as a string or message list, or .txt one per line) or the
built-in set in prompts.jsonl. The chat template is applied; decoding is greedy or seeded sampling.
Writes generations.jsonl and generations.html (one row per prompt, one column per model).
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
import time
from pathlib import Path

from dpolab.errors import DpolabError

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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab generate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        required=True,
        help="comma-separated: model dirs, run dirs (their final/), checkpoints, Hub ids, .gguf; "
        "'base' = the base model of the run the others belong to",
    )
    parser.add_argument("--prompts", help="prompts file (.jsonl or .txt); default: the built-in set of 20")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--do_sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="default: the run directory of the models, else runs/generate-<time>")
    return parser


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


def resolve_models(spec: str) -> tuple[list[tuple[str, str]], Path | None]:
    """[(label, model path)] from the --models list, and the run directory they belong to (if any)."""
    from dpolab.config import load_yaml
    from dpolab.evaluate import locate_model

    labels = [label.strip() for label in spec.split(",") if label.strip()]
    located = {label: locate_model(label) for label in labels if label != "base"}
    run_dirs = {run_dir for _, run_dir in located.values() if run_dir is not None}
    run_dir = next(iter(run_dirs)) if len(run_dirs) == 1 else None
    models = []
    for label in labels:
        if label == "base":
            if run_dir is None:
                raise DpolabError("'base' needs the other --models to be inside one dpolab run directory.")
            models.append(("base", load_yaml(run_dir / "config.yaml")["model_name_or_path"]))
        else:
            models.append((label, located[label][0]))
    return models, run_dir


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.models import load_tokenizer, resolve_model

    prompts = load_prompts(args.prompts)
    models, run_dir = resolve_models(args.models)
    output = Path(args.output_dir or run_dir or f"runs/generate-{time.strftime('%Y%m%d-%H%M%S')}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for label, model_name in models:
        path = resolve_model(model_name)
        tokenizer = load_tokenizer(path)
        if tokenizer.chat_template is None:
            raise DpolabError(f"{label} ({path}) has no chat template; `dpolab generate` needs a chat model.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
        replies = generate_responses(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            do_sample=args.do_sample, temperature=args.temperature, seed=args.seed, desc=f"Generating ({label})",
        )  # fmt: skip
        for index, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            rows.append({"prompt_index": index, "prompt": prompt, "model": label, **reply})
        del model
    output.mkdir(parents=True, exist_ok=True)
    (output / "generations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    stats = {label: length_stats([row for row in rows if row["model"] == label]) for label, _ in models}
    (output / "generations.html").write_text(generations_html(rows, stats, args), encoding="utf-8")
    print(format_stats(stats))
    print(f"written: {output / 'generations.jsonl'}, {output / 'generations.html'}")
    return rows


def format_stats(stats: dict) -> str:
    lines = [f"  {'model':<40}{'mean tok':>9}{'median':>8}{'hit max':>9}{'distinct-2':>11}{'repetition':>11}"]
    for label, s in stats.items():
        lines.append(
            f"  {label[-40:]:<40}{s['mean_new_tokens']:>9.1f}{s['median_new_tokens']:>8.1f}{s['hit_max_share']:>9.2f}"
            f"{s['distinct_2']:>11.3f}{s['repetition_rate']:>11.3f}"
        )
    return "\n".join(lines)


def stats_table_html(stats: dict) -> str:
    head = "<tr><th>model</th><th>mean new tokens</th><th>median</th><th>hit max_new_tokens</th>"
    head += "<th>distinct-2</th><th>repetition rate</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{s['mean_new_tokens']:.1f}</td><td>{s['median_new_tokens']:.1f}</td>"
        f"<td>{s['hit_max_share']:.0%}</td><td>{s['distinct_2']:.3f}</td><td>{s['repetition_rate']:.3f}</td></tr>"
        for label, s in stats.items()
    )
    return f"<table class='stats'>{head}{body}</table>"


def side_by_side_html(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(row["model"] for row in rows))
    by_prompt: dict[int, dict] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], {"prompt": row["prompt"]})[row["model"]] = row
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    body = ""
    for entry in by_prompt.values():
        prompt = html.escape(entry["prompt"][-1]["content"])
        cells = "".join(
            f"<td><pre>{html.escape(entry[label]['reply'])}</pre><small>{entry[label]['new_tokens']} tokens"
            f"{' (cut at max)' if entry[label]['hit_max'] else ''}</small></td>"
            for label in labels
        )
        body += f"<tr><td class='prompt'>{prompt}</td>{cells}</tr>"
    return f"<table class='side'>{head}{body}</table>"


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 6px 8px; vertical-align: top; text-align: left; font-size: 13px; }
th { background: #f3f3f3; }
pre { white-space: pre-wrap; margin: 0; font-family: inherit; max-width: 420px; }
td.prompt { max-width: 260px; font-weight: 600; }
small { color: #777; }
"""


def generations_html(rows: list[dict], stats: dict, args) -> str:
    decoding = f"sampling, temperature {args.temperature}, seed {args.seed}" if args.do_sample else "greedy"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dpolab generations</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>Generations</h1>"
        f"<p>{decoding}; max_new_tokens {args.max_new_tokens}; chat template applied.</p>"
        f"{stats_table_html(stats)}{side_by_side_html(rows)}</body></html>"
    )
