"""`dpolab report RUN_DIR`: curves as PNGs and one self-contained report.html, diagnostics at the top.

Reads only what the other workflows wrote (metrics.jsonl, config.yaml, summary.json, sweep.csv/png,
eval/*/eval.json, generations.jsonl, demo.json); it never runs a model.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
from pathlib import Path

from dpolab.errors import DpolabError

# The five curves people watch, then the optimizer's own.
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
CONFIG_SUMMARY_KEYS = (
    "model_name_or_path", "dataset_name", "train_split", "eval_split", "loss_type", "beta", "learning_rate",
    "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "max_steps",
    "num_train_epochs", "use_peft", "bf16", "dtype", "seed",
)  # fmt: skip


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value."""
    smoothed, last = [], 0.0
    for count, value in enumerate(values, start=1):
        last = last * weight + (1 - weight) * value
        smoothed.append(last / (1 - weight**count))
    return smoothed


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    return parser


def run(args: argparse.Namespace) -> Path:
    from dpolab.diagnostics import diagnose
    from dpolab.train import read_jsonl

    run_dir = Path(args.run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        raise DpolabError(f"{run_dir} has no metrics.jsonl (or it is empty): is it a dpolab run directory?")
    config = _read_yaml(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    generations = read_jsonl(run_dir / "generations.jsonl")
    final_eval = _read_json(run_dir / "eval" / "final" / "eval.json")
    length_bias = final_eval.get("length_bias") if final_eval else None

    images = plot_curves(records, run_dir / "plots")
    findings = diagnose(records, float(config.get("beta", 0.1)), generation_lengths(generations), length_bias)
    page = render(run_dir, records, config, summary, images, findings, generations, final_eval)
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    print(f"{len(findings)} diagnostic finding(s); report: {path}")
    return path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_yaml(path: Path) -> dict:
    from dpolab.config import load_yaml

    return load_yaml(path) if path.is_file() else {}


def generation_lengths(rows: list[dict]) -> list[tuple[str, float]]:
    """Mean reply length per model, in the order the models were given (base first, final last)."""
    labels = list(dict.fromkeys(row["model"] for row in rows))
    return [
        (label, sum(r["new_tokens"] for r in rows if r["model"] == label) / sum(r["model"] == label for r in rows))
        for label in labels
    ]


# --- plots ------------------------------------------------------------------------------------------------------


def plot_curves(records: list[dict], directory: Path) -> list[tuple[str, Path]]:
    """One PNG per curve: raw, EMA 0.6 and 0.8, eval points when present; steps below, epochs on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    epochs = [(r["step"], r["epoch"]) for r in records if r.get("epoch") is not None and r["step"] > 0]
    images = []
    for key, title in CURVES:
        train = [(r["step"], r[key]) for r in records if key in r and r["step"] > 0]
        evaluated = [(r["step"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]
        if not train and not evaluated:
            continue
        figure, axis = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
        if train:
            steps, values = zip(*train)
            axis.plot(steps, values, color="#9ab", linewidth=1, label="train (raw)")
            for weight, color in zip(SMOOTHING, ("#1f77b4", "#08306b")):
                axis.plot(steps, ema(list(values), weight), color=color, linewidth=1.8, label=f"train (EMA {weight})")
        if evaluated:
            steps, values = zip(*evaluated)
            axis.plot(steps, values, "o-", color="#d62728", linewidth=1.5, label="eval")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        if len(epochs) >= 2 and epochs[-1][0] > epochs[0][0]:
            per_step = (epochs[-1][1] - epochs[0][1]) / (epochs[-1][0] - epochs[0][0])
            if per_step > 0:
                to_epoch, to_step = (lambda s, k=per_step: s * k), (lambda e, k=per_step: e / k)
                top = axis.secondary_xaxis("top", functions=(to_epoch, to_step))
                top.set_xlabel("epoch")
        path = directory / f"{key.replace('/', '_')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        images.append((title, path))
    return images


# --- HTML ---------------------------------------------------------------------------------------------------------

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
pre { white-space: pre-wrap; margin: 0; font-family: inherit; }
"""

# Records, for anyone (and the browser test) opening the page, whether every embedded image decoded.
IMAGE_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', loaded + '/' + images.length);
});
"""


def _image_tag(path: Path, alt: str, css: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img class='{css}' alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(run_dir, records, config, summary, images, findings, generations, final_eval) -> str:
    from dpolab.generate import length_stats, side_by_side_html, stats_table_html

    sections = [f"<h1>dpolab run: {html.escape(run_dir.name)}</h1>"]
    provenance = config.get("dpolab_provenance", {})
    sections.append(
        f"<p class='muted'>{html.escape(str(run_dir))} · created {html.escape(str(provenance.get('created', '?')))}"
        f" · data format: {html.escape(str(provenance.get('data_format', '?')))}</p>"
    )

    sections.append("<h2>Diagnostics</h2>")
    if findings:
        for finding in findings:
            sections.append(
                f"<div class='finding'><b>{html.escape(finding.name)}</b><br>{html.escape(finding.evidence)}"
                f"<br><i>Try:</i> {html.escape(finding.suggestion)}</div>"
            )
    else:
        sections.append(
            "<div class='ok'>No known DPO failure pattern in these curves (divergence, no learning, likelihood "
            "displacement, overfitting, drift from the reference, length exploitation).</div>"
        )

    if summary:
        sections.append("<h2>Final metrics</h2>")
        rate = summary.get("pairs_per_s")
        sections.append(
            f"<p>{summary['steps']} steps, {summary['epochs']:.2f} epochs, {summary['runtime_s']:.0f} s"
            + (f", {rate:.2f} pairs/s" if rate else "")
            + "</p>"
        )
        keys = list(dict.fromkeys([*summary.get("final", {}), *summary.get("final_eval", {})]))
        rows = [[k, summary["final"].get(k, "-"), summary["final_eval"].get(k, "-")] for k in keys]
        sections.append(_table(["metric", "train (last logged)", "eval (last)"], rows))
        best = summary.get("best", {})
        if best:
            sections.append(_table(["best", "value", "step"], [[k, v["value"], v["step"]] for k, v in best.items()]))

    demo = _read_json(run_dir / "demo.json")
    if demo:
        sections.append("<h2>Demo: held-out questions, before -> after</h2>")
        rows = [["greedy answers right", demo["greedy_right"]["before"], demo["greedy_right"]["after"]]]
        for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "chosen_logp_higher"):
            rows.append([key, demo["eval_before"].get(key, "-"), demo["eval_after"].get(key, "-")])
        sections.append(_table(["", "before", "after"], rows))
        sections.append(
            "<p class='muted'>Before training the policy is the reference: margins are 0 and TRL's strict '>' "
            "counts every tie as wrong.</p>"
        )
        examples = [[e["question"], e["before"], e["after"]] for e in demo.get("examples", [])]
        sections.append(_table(["question", "before", "after"], examples))

    sections.append(
        "<h2>Curves</h2><p class='muted'>Raw values, and EMA-smoothed with weights 0.6 and 0.8 (TensorBoard's "
        "smoothing). Log-probs are sums over completion tokens, as TRL logs them.</p>"
    )
    sections.append("<div class='grid'>" + "".join(_image_tag(path, title) for title, path in images) + "</div>")

    sweep_csv, sweep_png = run_dir / "sweep.csv", run_dir / "sweep.png"
    if sweep_csv.is_file():
        sections.append("<h2>Checkpoint sweep (held-out)</h2>")
        rows = list(csv.DictReader(sweep_csv.open(encoding="utf-8")))
        header = list(rows[0]) if rows else []
        sections.append(_table(header, [[_number(row[h]) for h in header] for row in rows]))
        if sweep_png.is_file():
            sections.append(_image_tag(sweep_png, "checkpoint sweep", "wide"))

    if final_eval and final_eval.get("length_bias"):
        bias = final_eval["length_bias"]
        sections.append("<h2>Length bias (final model, held-out)</h2>")
        sections.append(_table(
            ["chosen - rejected tokens", "pairs", "accuracy", "mean margin", "mean per-token margin"],
            [[b["length_difference"], b["pairs"], b["accuracy"], b["mean_margin"], b["mean_margin_per_token"]]
             for b in bias["buckets"]],
        ))  # fmt: skip
        sections.append(
            "<p>Pearson / Spearman of margin vs length difference: "
            f"{_fmt(bias['pearson_margin_vs_length_difference'])} / "
            f"{_fmt(bias['spearman_margin_vs_length_difference'])}; "
            f"model accuracy {bias['model_accuracy']:.3f} vs "
            f"'longer answer wins' {bias['longer_wins_accuracy']:.3f}.</p>"
        )

    if generations:
        labels = list(dict.fromkeys(row["model"] for row in generations))
        stats = {label: length_stats([r for r in generations if r["model"] == label]) for label in labels}
        sections.append("<h2>Generations</h2>" + stats_table_html(stats) + side_by_side_html(generations))

    sections.append("<h2>Configuration</h2>")
    sections.append(_table(["field", "value"], [[k, config[k]] for k in CONFIG_SUMMARY_KEYS if k in config]))
    full = {k: v for k, v in config.items() if k != "dpolab_provenance"}
    sections.append(
        "<details><summary>every resolved field</summary>"
        + _table(["field", "value"], [[k, v] for k, v in full.items()])
        + "</details>"
    )
    versions = provenance.get("versions", {})
    if versions:
        sections.append("<h2>Versions</h2>" + _table(["package", "version"], [[k, v] for k, v in versions.items()]))
        sections.append(f"<p class='muted'>git commit: {html.escape(str(provenance.get('git_commit')))}</p>")

    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>dpolab report: {html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
        + "".join(sections)
        + f"<script>{IMAGE_CHECK}</script></body></html>"
    )


def _number(text: str):
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text
