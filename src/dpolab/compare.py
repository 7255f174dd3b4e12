"""`dpolab compare RUN_A RUN_B [...]`: runs side by side in one self-contained compare.html and its PNGs.

The settings that differ between the runs come first, then final and best metrics, each run's diagnostics, the
five curves (plus learning rate and grad norm) of every run overlaid on the same axes, eval curves and
checkpoint sweeps overlaid, length-bias summaries side by side, and generations side by side where the runs
share prompts. Reads only what the runs wrote (a missing piece shows "not run"); imports neither torch nor
transformers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from dpolab.errors import DpolabError
from dpolab.render import CURVES, RUN_COLOURS
from dpolab.rundir import KEY_METRICS, PROVENANCE_KEY, RunDir, RunFiles, read_run_files, write_atomic

COMPARE_HTML = "compare.html"
NOT_RUN = "not run"
# Settings shown first when they differ (any other differing field follows them).
LEADING_SETTINGS = (
    "loss_type", "beta", "learning_rate", "loss_weights", "label_smoothing", "lr_scheduler_type", "warmup_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_steps", "num_train_epochs",
    "dtype", "bf16", "use_peft", "model_name_or_path", "dataset_name", "seed",
)  # fmt: skip
# Fields that name or place a run rather than configure it.
RUN_IDENTITY = {"run_name", "runs_dir", "logging_dir", "resume"}


@dataclass
class CompareConfig:
    """Runs side by side: compare.html and PNGs with the settings that differ, metrics, diagnostics, curves
    overlaid, sweeps, length bias and generations."""

    runs: list[str] = field(metadata={"positional": True, "help": "two or more run directories"})
    output_dir: str | None = field(
        default=None, metadata={"help": "where compare.html and the PNGs go (default: RUNS_DIR/compare-<names>)"}
    )


def run(config: CompareConfig) -> Path:
    runs = read_runs(config.runs)
    output = Path(config.output_dir) if config.output_dir else default_output(runs)
    output.mkdir(parents=True, exist_ok=True)
    images = plot_curves(runs, output)
    from dpolab.render import plot_judge, plot_sweep

    sweep_image = plot_where_present(runs, "sweep", plot_sweep, output / "sweeps.png")
    judge_image = plot_where_present(runs, "judge", plot_judge, output / "judge.png")
    path = output / COMPARE_HTML
    write_atomic(path, render(runs, images, sweep_image, judge_image))
    differing = differing_settings(runs)
    print(console_table(runs, differing))
    print(f"compared {len(runs)} runs; settings that differ: {', '.join(differing) or 'none'}; page: {path}")
    return path


def read_runs(paths: list[str]) -> dict[str, RunFiles]:
    """{label: what the run wrote}; labels are the run directories' names (made unique when two collide)."""
    if len(paths) < 2:
        raise DpolabError(f"compare needs at least two run directories, got {len(paths)}.")
    runs = {}
    for path in paths:
        files = read_run_files(RunDir(Path(path)))
        label = files.run.name if files.run.name not in runs else str(files.run.path)
        runs[label] = files
    return runs


def default_output(runs: dict[str, RunFiles]) -> Path:
    parent = next(iter(runs.values())).run.path.parent
    return parent / ("compare-" + "-vs-".join(runs))[:120]


# --- settings and metrics (pure) ----------------------------------------------------------------------------------


def settings_of(files: RunFiles) -> dict:
    return {k: v for k, v in files.config.items() if k != PROVENANCE_KEY and k not in RUN_IDENTITY}


def differing_settings(runs: dict[str, RunFiles]) -> list[str]:
    """The config fields whose values are not the same in every run, the usual suspects first."""
    configs = [settings_of(files) for files in runs.values()]
    keys = sorted({key for config in configs for key in config})
    differing = [key for key in keys if len({repr(config.get(key)) for config in configs}) > 1]
    leading = [key for key in LEADING_SETTINGS if key in differing]
    return leading + [key for key in differing if key not in leading]


def metric_rows(runs: dict[str, RunFiles]) -> list[list]:
    """[metric, value per run]: run size and speed, final train and eval metrics, best values, held-out eval."""
    summaries = {label: files.summary or {} for label, files in runs.items()}
    rows = []
    for key, label in (("steps", "steps"), ("epochs", "epochs"), ("setup_s", "set-up (s)"),
                       ("runtime_s", "runtime (s)"), ("pairs_per_s", "pairs/s while training")):  # fmt: skip
        # a finished run without the key: written before dpolab recorded it (setup_s: 2026-11-26)
        rows.append([label, *(summaries[run].get(key, "not recorded" if summaries[run] else NOT_RUN) for run in runs)])
    for key in KEY_METRICS:
        rows.append([f"final {key}", *(summaries[run].get("final", {}).get(key, NOT_RUN) for run in runs)])
    for key in KEY_METRICS:
        rows.append([f"final eval_{key}", *(summaries[run].get("final_eval", {}).get(key, NOT_RUN) for run in runs)])
    best_keys = list(dict.fromkeys(key for s in summaries.values() for key in s.get("best", {})))
    for key in best_keys:
        cells = []
        for run in runs:
            best = summaries[run].get("best", {}).get(key)
            cells.append(f"{best['value']:.4g} (step {best['step']})" if best else NOT_RUN)
        rows.append([f"best {key}", *cells])
    for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "chosen_logp_higher"):
        cells = []
        for files in runs.values():
            evaluation = files.final_eval
            if evaluation is None:
                cells.append(NOT_RUN)
            else:
                source = (
                    evaluation["per_pair_mean"] if key == "chosen_logp_higher" else evaluation["trainer_equivalent"]
                )
                cells.append(source.get(key))
        rows.append([f"dpolab eval (final): {key}", *cells])
    return rows


def console_table(runs: dict[str, RunFiles], differing: list[str]) -> str:
    """The settings that differ (`differing_settings`) and every metric some run has, one column per run, for a
    terminal."""
    from dpolab.render import cell_text, text_table

    configs = [settings_of(files) for files in runs.values()]
    rows = [[key, *(config.get(key, NOT_RUN) for config in configs)] for key in differing]
    rows += [row for row in metric_rows(runs) if any(value not in (NOT_RUN, None) for value in row[1:])]
    # lists joined by a comma alone: one word per cell, so the columns stay columns
    return text_table([[row[0], *(cell_text(value, ",") for value in row[1:])] for row in [["", *runs], *rows]])


LENGTH_BIAS_ROWS = (
    ("model accuracy", "model_accuracy"),
    ("'longer answer wins' accuracy", "longer_wins_accuracy"),
    ("Pearson margin vs length difference", "pearson_margin_vs_length_difference"),
    ("Spearman margin vs length difference", "spearman_margin_vs_length_difference"),
    ("Pearson per-token margin vs length difference", "pearson_per_token_margin_vs_length_difference"),
    ("chosen longer (share of pairs)", "chosen_longer_share"),
)


def length_bias_rows(runs: dict[str, RunFiles]) -> list[list]:
    rows = []
    for label, key in LENGTH_BIAS_ROWS:
        cells = []
        for files in runs.values():
            bias = (files.final_eval or {}).get("length_bias")
            cells.append(NOT_RUN if bias is None else bias.get(key))
        rows.append([label, *cells])
    return rows


def final_generations(runs: dict[str, RunFiles]) -> list[dict]:
    """Each run's replies of its last generated model (its final one), labelled by run, on prompts every run
    answered; [] when the runs share no prompt."""
    from dpolab.render import prompt_text

    per_run = {}
    for label, files in runs.items():
        if not files.generations:
            continue
        last_model = list(dict.fromkeys(row["model"] for row in files.generations))[-1]
        per_run[label] = {prompt_text(r["prompt"]): r for r in files.generations if r["model"] == last_model}
    if len(per_run) < 2:
        return []
    shared = set.intersection(*(set(replies) for replies in per_run.values()))
    order = [prompt for prompt in next(iter(per_run.values())) if prompt in shared]
    return [{**replies[prompt], "run": label} for prompt in order for label, replies in per_run.items()]


# --- plots --------------------------------------------------------------------------------------------------------


def plot_curves(runs: dict[str, RunFiles], output: Path) -> list[tuple[str, Path]]:
    from dpolab.render import plot_runs_curve

    records = {label: files.records for label, files in runs.items()}
    images = []
    for key, title in CURVES:
        path = output / f"{key.replace('/', '_')}.png"
        if plot_runs_curve(records, key, title, path):
            images.append((title, path))
    return images


def plot_where_present(runs: dict[str, RunFiles], attribute: str, plot, path: Path) -> Path | None:
    """One figure over the runs that wrote `attribute` (a sweep, a judge summary); None when none did."""
    present = {label: getattr(files, attribute) for label, files in runs.items() if getattr(files, attribute)}
    if not present:
        return None
    plot(present, path)
    return path


# --- HTML ---------------------------------------------------------------------------------------------------------


def render(runs: dict[str, RunFiles], images: list[tuple[str, Path]], sweep_image: Path | None,
           judge_image: Path | None = None) -> str:  # fmt: skip
    from dpolab.diagnostics import diagnose_run
    from dpolab.render import findings_html, generation_stats_table, image_tag, page, side_by_side, table

    labels = list(runs)
    legend = " ".join(
        f"<span style='color:{RUN_COLOURS[i % len(RUN_COLOURS)]}'>&#9632; {html.escape(label)}</span>"
        for i, label in enumerate(labels)
    )
    sections = [f"<h1>dpolab compare: {len(runs)} runs</h1><p>{legend}</p>"]

    differing = differing_settings(runs)
    configs = {label: settings_of(files) for label, files in runs.items()}
    sections.append("<h2>Settings that differ</h2>")
    if differing:
        rows = [[key, *(configs[label].get(key, NOT_RUN) for label in labels)] for key in differing]
        sections.append(table(["setting", *labels], rows, ["differs"] * len(rows)))
    else:
        sections.append("<p>None: every setting is the same (runs differ only by chance, e.g. hardware).</p>")
    same = [key for key in LEADING_SETTINGS if key not in differing and key in configs[labels[0]]]
    sections.append(
        "<details><summary>settings the runs share</summary>"
        + table(["setting", "value"], [[key, configs[labels[0]][key]] for key in same])
        + "</details>"
    )

    sections.append("<h2>Final and best metrics</h2>" + table(["metric", *labels], metric_rows(runs)))

    sections.append("<h2>Diagnostics</h2>")
    for label, files in runs.items():
        findings = diagnose_run(files.records, files.config, files.summary, files.generation_stats, files.final_eval)
        sections.append(f"<h3>{html.escape(label)}</h3>" + findings_html([f.as_dict() for f in findings]))

    sections.append(
        "<h2>Curves</h2><p class='muted'>Every run on the same axes, by optimizer step (left) and by epoch "
        "(right); each run one colour. Faint: raw values; solid: EMA 0.6; circles: eval.</p>"
        + "".join(image_tag(path, title, "wide") for title, path in images)
    )

    sections.append("<h2>Checkpoint sweeps (held-out)</h2>")
    if sweep_image is not None:
        sections.append(image_tag(sweep_image, "checkpoint sweeps", "wide"))
    missing = [label for label, files in runs.items() if not files.sweep]
    if missing:
        sections.append(f"<p class='muted'>{NOT_RUN} for: {html.escape(', '.join(missing))} (`dpolab sweep RUN`).</p>")

    sections.append(
        "<h2>Length bias (final model, held-out)</h2>" + table(["statistic", *labels], length_bias_rows(runs))
    )

    sections.append("<h2>Generations</h2>")
    rows = final_generations(runs)
    if rows:
        stats = {}  # each run's statistics of its final model's replies
        for label, files in runs.items():
            models = (files.generation_stats or {}).get("models", {})
            if models:
                stats[label] = list(models.values())[-1]
        sections.append(generation_stats_table(stats))
        sections.append(side_by_side(rows, label_key="run"))
    else:
        sections.append(f"<p class='muted'>{NOT_RUN}: the runs share no generated prompts (`dpolab generate`).</p>")

    sections.append("<h2>Judged answers</h2>")
    judged = {label: files.judge for label, files in runs.items() if files.judge}
    if judged:
        from dpolab.render import judge_html

        sections.append(image_tag(judge_image, "win rates against base", "wide") if judge_image else "")
        sections.append(judge_html(judged))
    missing = [label for label in runs if label not in judged]
    if missing:
        sections.append(f"<p class='muted'>{NOT_RUN} for: {html.escape(', '.join(missing))} (`dpolab judge RUN`).</p>")
    return page(f"dpolab compare: {', '.join(labels)}", sections)
