"""`dpolab report RUN_DIR`: curves as PNGs and one self-contained report.html, diagnostics at the top.

Reads only what the other workflows wrote (metrics.jsonl, config.yaml, summary.json, sweep.csv/png,
eval/final/eval.json, generations.json(l), judge.json, demo.json); it never runs a model and imports neither
torch nor transformers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.render import CURVES, ema  # noqa: F401  (ema: TensorBoard's smoothing, re-exported for readers)
from dpolab.rundir import PROVENANCE_KEY, REPORT_HTML, SWEEP_PNG, RunDir, RunFiles, read_run_files, write_atomic

CONFIG_SUMMARY_KEYS = (
    "model_name_or_path", "dataset_name", "train_split", "eval_split", "loss_type", "beta", "learning_rate",
    "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_steps",
    "num_train_epochs", "use_peft", "bf16", "dtype", "fast_path", "seed",
)  # fmt: skip


@dataclass
class ReportConfig:
    """Curves (PNG), diagnostics and a self-contained report.html for one run."""

    run_dir: str = field(metadata={"positional": True, "help": "the run directory"})


def run(config: ReportConfig) -> Path:
    from dpolab.diagnostics import diagnose_run, finding_text

    files = read_run_files(RunDir(Path(config.run_dir)))
    images = plot_curves(files)
    findings = diagnose_run(files.records, files.config, files.summary, files.generation_stats, files.final_eval)
    path = files.run.file(REPORT_HTML)
    found = [finding.as_dict() for finding in findings]
    write_atomic(path, render(files, images, found))
    for finding in found:  # the page's first section, in the terminal too
        print(finding_text(finding))
    print(f"{len(findings)} diagnostic finding(s); report: {path}")
    return path


def plot_curves(files: RunFiles) -> list[tuple[str, Path]]:
    """One PNG per curve the run logged (raw, EMA 0.6 and 0.8, eval points), in plots/."""
    from dpolab.render import plot_run_curve

    files.run.plots_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for key, title in CURVES:
        path = files.run.plots_dir / f"{key.replace('/', '_')}.png"
        if plot_run_curve(files.records, key, title, path):
            images.append((title, path))
    return images


# --- HTML ---------------------------------------------------------------------------------------------------------


def render(files: RunFiles, images: list[tuple[str, Path]], findings: list[dict]) -> str:
    from dpolab.render import page

    sections = [
        header_section(files),
        "<h2>Diagnostics</h2>" + findings_section(findings),
        summary_section(files.summary),
        demo_section(files.demo),
        curves_section(images),
        sweep_section(files),
        length_bias_section(files.final_eval),
        generations_section(files),
        judge_section(files),
        config_section(files.config),
    ]
    return page(f"dpolab report: {files.run.name}", [section for section in sections if section])


def header_section(files: RunFiles) -> str:
    provenance = files.config.get(PROVENANCE_KEY, {})
    return (
        f"<h1>dpolab run: {html.escape(files.run.name)}</h1><p class='muted'>{html.escape(str(files.run.path))} · "
        f"created {html.escape(str(provenance.get('created', '?')))} · data format: "
        f"{html.escape(str(provenance.get('data_format', '?')))}</p>"
    )


def findings_section(findings: list[dict]) -> str:
    from dpolab.render import findings_html

    return findings_html(findings)


def summary_section(summary: dict | None) -> str:
    from dpolab.render import table

    if not summary:
        return ""
    rate, setup_s = summary.get("pairs_per_s"), summary.get("setup_s")  # setup_s: not in runs before 2026-11-26
    parts = [
        "<h2>Final metrics</h2>",
        "<p>"
        + (f"set-up {setup_s:.0f} s (data, model, reference pre-pass), " if setup_s is not None else "")
        + f"{summary['steps']} steps, {summary['epochs']:.2f} epochs, {summary['runtime_s']:.0f} s"
        + (f", {rate:.2f} pairs/s while training" if rate else "")
        + "</p>",
    ]
    keys = list(dict.fromkeys([*summary.get("final", {}), *summary.get("final_eval", {})]))
    rows = [[k, summary["final"].get(k), summary["final_eval"].get(k)] for k in keys]
    parts.append(table(["metric", "train (last logged)", "eval (last)"], rows))
    best = summary.get("best", {})
    if best:
        parts.append(table(["best", "value", "step"], [[k, v["value"], v["step"]] for k, v in best.items()]))
    return "".join(parts)


def demo_section(demo: dict | None) -> str:
    from dpolab.render import table

    if not demo:
        return ""
    rows = [["greedy answers right", demo["greedy_right"]["before"], demo["greedy_right"]["after"]]]
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "chosen_logp_higher"):
        rows.append([key, demo["eval_before"].get(key), demo["eval_after"].get(key)])
    examples = [[e["question"], e["before"], e["after"]] for e in demo.get("examples", [])]
    return (
        "<h2>Demo: held-out questions, before -> after</h2>"
        + table(["", "before", "after"], rows)
        + "<p class='muted'>Before training the policy is the reference: margins are 0 and TRL's strict '>' counts "
        "every tie as wrong.</p>" + table(["question", "before", "after"], examples)
    )


def curves_section(images: list[tuple[str, Path]]) -> str:
    from dpolab.render import image_tag

    return (
        "<h2>Curves</h2><p class='muted'>Raw values, and EMA-smoothed with weights 0.6 and 0.8 (TensorBoard's "
        "smoothing). Log-probs are sums over completion tokens, as TRL logs them.</p>"
        + "<div class='grid'>"
        + "".join(image_tag(path, title) for title, path in images)
        + "</div>"
    )


def sweep_section(files: RunFiles) -> str:
    from dpolab.render import image_tag, table

    if not files.sweep:
        return ""
    header = list(files.sweep[0])
    parts = ["<h2>Checkpoint sweep (held-out)</h2>", table(header, [[row[h] for h in header] for row in files.sweep])]
    if files.run.file(SWEEP_PNG).is_file():
        parts.append(image_tag(files.run.file(SWEEP_PNG), "checkpoint sweep", "wide"))
    return "".join(parts)


def length_bias_section(final_eval: dict | None) -> str:
    from dpolab.render import fmt, table

    bias = (final_eval or {}).get("length_bias")
    if not bias:
        return ""
    rows = [[b["length_difference"], b["pairs"], b["accuracy"], b["mean_margin"], b["mean_margin_per_token"]]
            for b in bias["buckets"]]  # fmt: skip
    return (
        "<h2>Length bias (final model, held-out)</h2>"
        + table(["chosen - rejected tokens", "pairs", "accuracy", "mean margin", "mean per-token margin"], rows)
        + "<p>Pearson / Spearman of margin vs length difference: "
        f"{fmt(bias['pearson_margin_vs_length_difference'])} / {fmt(bias['spearman_margin_vs_length_difference'])}; "
        f"model accuracy {bias['model_accuracy']:.3f} vs 'longer answer wins' {bias['longer_wins_accuracy']:.3f}.</p>"
    )


def generations_section(files: RunFiles) -> str:
    from dpolab.render import generation_stats_table, side_by_side

    if not files.generations:
        return ""
    stats = (files.generation_stats or {}).get("models", {})
    return "<h2>Generations</h2>" + generation_stats_table(stats) + side_by_side(files.generations)


def judge_section(files: RunFiles) -> str:
    """`dpolab judge`'s win rates against the base model (judge.json), as a curve over checkpoints and a table."""
    if not files.judge:
        return ""
    from dpolab.render import image_tag, judge_html, plot_judge

    path = files.run.plots_dir / "judge.png"
    plot_judge({"": files.judge}, path)
    return "<h2>Judged answers</h2>" + image_tag(path, "win rates against base", "wide") + judge_html({"": files.judge})


def config_section(config: dict) -> str:
    from dpolab.render import table

    provenance = config.get(PROVENANCE_KEY, {})
    full = {k: v for k, v in config.items() if k != PROVENANCE_KEY}
    parts = [
        "<h2>Configuration</h2>",
        table(["field", "value"], [[k, config[k]] for k in CONFIG_SUMMARY_KEYS if k in config]),
        "<details><summary>every resolved field</summary>"
        + table(["field", "value"], [[k, v] for k, v in full.items()])
        + "</details>",
    ]
    versions = provenance.get("versions", {})
    if versions:
        parts.append("<h2>Versions</h2>" + table(["package", "version"], [[k, v] for k, v in versions.items()]))
        parts.append(f"<p class='muted'>git commit: {html.escape(str(provenance.get('git_commit')))}</p>")
    return "".join(parts)
