"""`dpolab report`: curves, diagnostics and one self-contained HTML page, checked in a real browser."""

import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import rows_in_format, write_jsonl

from dpolab.cli import main
from dpolab.report import ema

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip


def test_ema_matches_tensorboard_smoothing_by_hand():
    # weight 0.5: raw EMA 0.5*1=0.5 -> /(1-0.5)=1; then 0.25+0.5*3=1.75 -> /(1-0.25)=2.333...
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])
    assert ema([2.0, 2.0, 2.0], 0.8) == pytest.approx([2.0, 2.0, 2.0])  # debiased: a constant stays constant


@pytest.fixture
def full_run(tmp_path, tiny_config):
    """A run with eval curves, checkpoints, a sweep, an eval with length bias, and generations."""
    write_jsonl(tmp_path / "data" / "train.jsonl", rows_in_format("messages", 16))
    write_jsonl(tmp_path / "data" / "test.jsonl", rows_in_format("messages", 6, seed=3))
    config = tiny_config(tmp_path / "data", eval_split="test", eval_strategy="steps", eval_steps=2, max_steps=6,
                         save_strategy="steps", save_steps=3, learning_rate=5e-3)  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert main(["sweep", str(run_dir)]) == 0
    assert main(["eval", "--model", str(run_dir)]) == 0
    (tmp_path / "prompts.txt").write_text("What is 12 + 34?\nSay hello.\n")
    models = f"base,{run_dir}/checkpoint-3,{run_dir}"
    argv = ["generate", "--models", models, "--prompts", str(tmp_path / "prompts.txt"), "--max_new_tokens", "8"]
    assert main(argv) == 0
    assert main(["report", str(run_dir)]) == 0
    return run_dir


def test_report_holds_every_section_with_images_embedded(full_run):
    page = (full_run / "report.html").read_text()
    for heading in ("Diagnostics", "Final metrics", "Curves", "Checkpoint sweep", "Length bias", "Generations",
                    "Configuration", "Versions"):  # fmt: skip
        assert f"<h2>{heading}" in page, heading
    assert page.index("<h2>Diagnostics") < page.index("<h2>Curves")  # diagnostics at the top
    plots = sorted(p.name for p in (full_run / "plots").glob("*.png"))
    assert plots == sorted(["loss.png", "rewards_margins.png", "rewards_accuracies.png", "logps_chosen.png",
                            "logps_rejected.png", "learning_rate.png", "grad_norm.png"])  # fmt: skip
    assert page.count("src='data:image/png;base64,") == len(plots) + 1  # + the sweep plot
    assert "http://" not in page and "https://" not in page  # opens from disk, no network
    assert "trl" in page and "1.16.0" in page
    summary = json.loads((full_run / "summary.json").read_text())
    assert f"set-up {summary['setup_s']:.0f} s (data, model, reference pre-pass), {summary['steps']} steps" in page


def test_report_needs_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def render_in_chromium(page, tmp_path, name):
    """DOM after scripts ran, console lines, and a screenshot of `page` in headless Chromium."""
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}", "--enable-logging=stderr",
              "--v=0", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    screenshot = tmp_path / f"{name}.png"
    shot = subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={screenshot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0 and shot.returncode == 0, dom.stderr[-2000:] + shot.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() + shot.stderr.splitlines() if ":CONSOLE" in line]
    return dom.stdout, console, screenshot


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_report_and_generations_render_in_a_real_browser(full_run, tmp_path):
    dom, console, screenshot = render_in_chromium(full_run / "report.html", tmp_path, "report")
    assert console == [], console  # the page logs nothing: no errors, no warnings
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load handler did not run"
    assert loaded.group(1) == loaded.group(2) and int(loaded.group(2)) == 8, loaded.group(0)  # every image decoded
    assert screenshot.stat().st_size > 50_000
    shutil.copy(screenshot, full_run / "report-screenshot.png")

    dom, console, screenshot = render_in_chromium(full_run / "generations.html", tmp_path, "generations")
    assert console == [] and "What is 12 + 34?" in dom
    assert screenshot.stat().st_size > 10_000


def test_readers_import_neither_torch_nor_transformers(full_run, tmp_path):
    """report and lengthbias read what runs wrote: they work with torch and transformers made unimportable."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from dpolab.cli import main\n"
        f"assert main(['report', {str(full_run)!r}]) == 0\n"
        f"assert main(['lengthbias', {str(full_run / 'eval' / 'final')!r}]) == 0\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report:" in result.stdout and "Spearman" in result.stdout
