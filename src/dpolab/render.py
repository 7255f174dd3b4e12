"""Drawing what runs wrote: self-contained HTML pieces and matplotlib PNGs, shared by report, compare, generate,
sweep and judge. Pure presentation: no torch, no model, no reading of run files (callers pass the values).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

# The curves people watch, then the optimizer's own; TRL's metric names.
CURVES = (
    ("loss", "DPO loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward accuracy (strict >)"),
    ("logps/chosen", "log-prob of chosen (sum over tokens)"),
    ("logps/rejected", "log-prob of rejected (sum over tokens)"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "gradient norm"),
)
SMOOTHING = (0.6, 0.8)
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 10px 0; }
th, td { border: 1px solid #ccc; padding: 5px 9px; text-align: left; font-size: 13px; vertical-align: top; }
th { background: #f3f3f3; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 12px; }
.grid img, img.wide { width: 100%; border: 1px solid #eee; }
.finding { border-left: 5px solid #d62728; background: #fff4f4; padding: 8px 12px; margin: 8px 0; }
.ok { border-left: 5px solid #2ca02c; background: #f2fbf2; padding: 8px 12px; }
.muted { color: #777; font-size: 13px; }
.differs { background: #fff8e1; }
pre { white-space: pre-wrap; margin: 0; font-family: inherit; max-width: 420px; }
td.prompt { max-width: 260px; font-weight: 600; }
small { color: #777; }
"""

# Records, for anyone (and the browser test) opening the page, whether every embedded image decoded.
IMAGE_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', loaded + '/' + images.length);
});
"""


# --- HTML ---------------------------------------------------------------------------------------------------------


def page(title: str, sections: list[str]) -> str:
    """A whole self-contained page (styles and images inline: it opens from disk, with no network)."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>" + "".join(sections) + f"<script>{IMAGE_CHECK}</script></body></html>"
    )


def image_tag(path: Path, alt: str, css: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img class='{css}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def cell_text(value, separator: str = ", ") -> str:
    """A table cell as plain text: None as '-', floats to 4 significant digits, lists joined by `separator`."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return separator.join(map(str, value))
    return str(value)


def fmt(value) -> str:
    """A table cell of an HTML page: `cell_text`, escaped."""
    return html.escape(cell_text(value))


def text_table(rows: list[list[str]], align: str = "<") -> str:
    """Rows of cells as text columns two spaces apart, each as wide as its widest cell (`align`: '<' or '>')."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(f"{cell:{align}{width}}" for cell, width in zip(row, widths)).rstrip() for row in rows)


def table(header: list[str], rows: list[list], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    classes = row_classes or [""] * len(rows)
    body = "".join(
        f"<tr class='{css}'>" + "".join(f"<td>{fmt(cell)}</td>" for cell in row) + "</tr>"
        for row, css in zip(rows, classes, strict=True)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def findings_html(findings: list[dict]) -> str:
    """Diagnostic findings (name, evidence, suggestion), or the all-clear."""
    if not findings:
        return (
            "<div class='ok'>No known DPO failure pattern in these curves (divergence, no learning, weights that "
            "did not move, likelihood displacement, overfitting, drift from the reference, length "
            "exploitation).</div>"
        )
    return "".join(
        f"<div class='finding'><b>{html.escape(f['name'])}</b><br>{html.escape(f['evidence'])}"
        f"<br><i>Try:</i> {html.escape(f['suggestion'])}</div>"
        for f in findings
    )


def generation_stats_table(stats: dict[str, dict]) -> str:
    head = "<tr><th>model</th><th>mean new tokens</th><th>median</th><th>hit max_new_tokens</th>"
    head += "<th>distinct-2</th><th>repetition rate</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{s['mean_new_tokens']:.1f}</td><td>{s['median_new_tokens']:.1f}</td>"
        f"<td>{s['hit_max_share']:.0%}</td><td>{s['distinct_2']:.3f}</td><td>{s['repetition_rate']:.3f}</td></tr>"
        for label, s in stats.items()
    )
    return f"<table class='stats'>{head}{body}</table>"


def side_by_side(rows: list[dict], label_key: str = "model") -> str:
    """One row per prompt, one column per model (or run): each reply with its length."""
    labels = list(dict.fromkeys(row[label_key] for row in rows))
    by_prompt: dict[str, dict] = {}
    for row in rows:
        key = prompt_text(row["prompt"])
        by_prompt.setdefault(key, {})[row[label_key]] = row
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(label)}</th>" for label in labels) + "</tr>"
    body = ""
    for prompt, replies in by_prompt.items():
        cells = "".join(
            f"<td><pre>{html.escape(replies[label]['reply'])}</pre><small>{replies[label]['new_tokens']} tokens"
            f"{' (cut at max)' if replies[label].get('hit_max') else ''}</small></td>"
            if label in replies
            else "<td class='muted'>-</td>"
            for label in labels
        )
        body += f"<tr><td class='prompt'>{html.escape(prompt)}</td>{cells}</tr>"
    return f"<table class='side'>{head}{body}</table>"


def prompt_text(prompt) -> str:
    """The last user turn of a message-list prompt, or the prompt string itself."""
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


# --- plots --------------------------------------------------------------------------------------------------------


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value."""
    smoothed, last = [], 0.0
    for count, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        smoothed.append(last / (1 - weight**count))
    return smoothed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(records: list[dict], key: str) -> list[tuple[int, float | None, float]]:
    """(step, epoch, value) of one metric over metrics.jsonl records (step 0, logged before training, left out)."""
    return [(r["step"], r.get("epoch"), r[key]) for r in records if key in r and r["step"] > 0]


def plot_run_curve(records: list[dict], key: str, title: str, path: Path) -> bool:
    """One run's curve: raw, EMA 0.6 and 0.8, eval points; steps below, epochs on top. False when no data."""
    train, evaluated = series(records, key), series(records, f"eval_{key}")
    if not train and not evaluated:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    if train:
        steps, _, values = zip(*train)
        axis.plot(steps, values, color="#9ab", linewidth=1, label="train (raw)")
        for weight, colour in zip(SMOOTHING, ("#1f77b4", "#08306b")):
            axis.plot(steps, ema(list(values), weight), color=colour, linewidth=1.8, label=f"train (EMA {weight})")
    if evaluated:
        steps, _, values = zip(*evaluated)
        axis.plot(steps, values, "o-", color="#d62728", linewidth=1.5, label="eval")
    axis.set_title(title)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(key)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    epochs = [(step, epoch) for step, epoch, _ in train if epoch is not None]
    if len(epochs) >= 2 and epochs[-1][0] > epochs[0][0]:
        per_step = (epochs[-1][1] - epochs[0][1]) / (epochs[-1][0] - epochs[0][0])
        if per_step > 0:
            top = axis.secondary_xaxis("top", functions=(lambda s, k=per_step: s * k, lambda e, k=per_step: e / k))
            top.set_xlabel("epoch")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_runs_curve(records_by_run: dict[str, list[dict]], key: str, title: str, path: Path) -> bool:
    """Several runs' curve on the same axes, one colour per run: by step (left) and by epoch (right).

    Each run: its raw values faint, EMA 0.6 solid, eval points as circles. False when no run has the metric.
    """
    if not any(series(records, key) or series(records, f"eval_{key}") for records in records_by_run.values()):
        return False
    plt = _pyplot()
    figure, (by_step, by_epoch) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True, sharey=True)
    for index, (label, records) in enumerate(records_by_run.items()):
        colour = RUN_COLOURS[index % len(RUN_COLOURS)]
        for axis, position in ((by_step, 0), (by_epoch, 1)):
            train = [(point[position], point[2]) for point in series(records, key) if point[position] is not None]
            evaluated = [(p[position], p[2]) for p in series(records, f"eval_{key}") if p[position] is not None]
            if train:
                xs, values = zip(*train)
                axis.plot(xs, values, color=colour, alpha=0.25, linewidth=1)
                axis.plot(xs, ema(list(values), SMOOTHING[0]), color=colour, linewidth=1.8, label=label)
            if evaluated:
                xs, values = zip(*evaluated)
                axis.plot(xs, values, "o--", color=colour, linewidth=1, label=f"{label} (eval)")
    by_step.set_xlabel("optimizer step")
    by_epoch.set_xlabel("epoch")
    by_step.set_ylabel(key)
    for axis in (by_step, by_epoch):
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    figure.suptitle(f"{title} (faint: raw; solid: EMA {SMOOTHING[0]}; circles: eval)")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


SWEEP_PANELS = (
    ("held-out DPO loss", ("loss",)),
    ("held-out reward accuracy (strict >)", ("rewards/accuracies", "chosen_logp_higher")),
    ("held-out reward margin", ("rewards/margins",)),
    ("held-out log-probs (sum over tokens)", ("logps/chosen", "logps/rejected")),
)


def plot_sweep(rows_by_run: dict[str, list[dict]], path: Path) -> None:
    """Checkpoint sweeps (one run, or several overlaid with one colour each) in four panels."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    styles = ("-", "--")
    for axis, (title, keys) in zip(axes.flat, SWEEP_PANELS):
        for index, (label, rows) in enumerate(rows_by_run.items()):
            colour = RUN_COLOURS[index % len(RUN_COLOURS)] if len(rows_by_run) > 1 else None
            steps = [row["step"] for row in rows]
            for style, key in zip(styles, keys):
                values = [row.get(key) for row in rows]
                if any(value is not None for value in values):
                    name = key if len(rows_by_run) == 1 else f"{label}: {key}"
                    axis.plot(steps, values, marker="o", linestyle=style, color=colour, label=name)
        axis.set_title(title)
        axis.set_xlabel("optimizer step (0 = base model)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    names = ", ".join(rows_by_run)
    figure.suptitle(f"Checkpoint sweep: {names}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def judge_html(judges: dict[str, dict]) -> str:
    """Win rates against the baseline from judge.json, one table per run (label "" for a single run)."""
    parts = []
    for label, judge in judges.items():
        rows = []
        for name, model in judge["models"].items():
            interval = model.get("win_rate_ci")
            rows.append([
                name, model.get("step"), model.get("win_rate"),
                f"{interval[0]:.3f} - {interval[1]:.3f}" if interval else None, model.get("lc_win_rate"),
                model["mean_reward"], model["mean_length"],
            ])  # fmt: skip
        caption = f"<h3>{html.escape(label)}</h3>" if label else ""
        parts.append(
            caption
            + f"<p class='muted'>reward model {html.escape(str(judge['reward_model']))}; {judge['prompts']} prompts; "
            f"win rate against {html.escape(judge['baseline'])} (ties count half), 95% bootstrap interval over "
            "prompts; LC = length-controlled (AlpacaEval 2's regression on the length difference).</p>"
            + table(["model", "step", "win rate", "95% interval", "LC win rate", "mean reward", "mean length"], rows)
        )
        for name, extremes in judge.get("extremes", {}).items():
            for kind in ("won", "lost"):
                examples = extremes.get(kind, [])
                if examples:
                    parts.append(
                        f"<p><b>{html.escape(name)}: prompts it {kind} most against {html.escape(judge['baseline'])}"
                        "</b></p>"
                        + table(
                            ["prompt", judge["baseline"], name, "reward difference"],
                            [
                                [e["prompt"], e["baseline_answer"], e["answer"], e["reward_difference"]]
                                for e in examples
                            ],
                        )  # fmt: skip
                    )
    return "".join(parts)


def plot_judge(judges: dict[str, dict], path: Path) -> None:
    """Win rate (solid) and length-controlled win rate (dashed) against base, per checkpoint step, per run."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    for index, (label, judge) in enumerate(judges.items()):
        colour = RUN_COLOURS[index % len(RUN_COLOURS)]
        points = sorted(
            (m["step"], m["win_rate"], m["lc_win_rate"]) for m in judge["models"].values() if "win_rate" in m
        )
        if not points:
            continue
        steps, rates, controlled = zip(*points)
        name = f"{label}: " if label else ""
        axis.plot(steps, rates, "o-", color=colour, label=f"{name}win rate")
        axis.plot(steps, controlled, "s--", color=colour, label=f"{name}length-controlled")
    axis.axhline(0.5, color="#999", linewidth=1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("win rate against base")
    axis.set_title("Judged answers (reward model)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)
