"""`dpolab compare` and `dpolab train --grid`: runs side by side, a grid of runs that resumes, checked in a browser."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import rows_in_format, write_jsonl
from test_report import CHROMIUM, render_in_chromium

from dpolab.cli import main


def synthetic_run(root, name, chosen_slope, loss_type, steps=30):
    """A run directory as `dpolab train` writes it, with logps/chosen moving at `chosen_slope` per step."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        records.append({
            "step": step, "epoch": step / steps, "loss": 0.69 - 0.01 * step, "grad_norm": 3.0,
            "learning_rate": 1e-5, "rewards/margins": 0.02 * step, "rewards/accuracies": 0.8,
            "rewards/chosen": 0.01 * step, "rewards/rejected": -0.01 * step,
            "logps/chosen": -40.0 + chosen_slope * step, "logps/rejected": -42.0 - 0.6 * step,
        })  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"model_name_or_path": "m", "dataset_name": "d", "beta": 0.1, "loss_type": loss_type,
              "learning_rate": 1e-5, "seed": 0, "run_name": name}  # fmt: skip
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_a_cell_reads_the_same_in_the_terminal_and_on_the_page():
    from dpolab.render import cell_text, fmt

    assert cell_text(None) == fmt(None) == "-"  # a run without the metric: '-' in both, not 'None' in the terminal
    assert cell_text(0.123456) == fmt(0.123456) == "0.1235"
    assert cell_text(["sigmoid", "sft"], ",") == "sigmoid,sft" and fmt(["sigmoid", "sft"]) == "sigmoid, sft"
    assert fmt("<b>") == "&lt;b&gt;" and cell_text("<b>") == "<b>"


def test_compare_puts_the_settings_that_differ_first_and_names_each_runs_diagnostics(tmp_path, capsys):
    pure = synthetic_run(tmp_path, "pure-dpo", chosen_slope=-0.5, loss_type=["sigmoid"])
    with_sft = synthetic_run(tmp_path, "dpo-sft", chosen_slope=0.2, loss_type=["sigmoid", "sft"])
    assert main(["compare", str(pure), str(with_sft), "--output_dir", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "settings that differ: loss_type" in out
    assert re.search(r"^ +pure-dpo +dpo-sft$", out, re.M) and re.search(r"^loss_type +sigmoid +sigmoid,sft$", out, re.M)
    assert "final loss" not in out  # neither run wrote a summary: no row of "not run" only
    page = (tmp_path / "cmp" / "compare.html").read_text()
    differ = page.index("<h2>Settings that differ")
    assert differ < page.index("<h2>Final and best metrics") < page.index("<h2>Curves")
    assert "loss_type" in page[differ : page.index("<h2>Final and best metrics")]
    diagnostics = page[page.index("<h2>Diagnostics") : page.index("<h2>Curves")]
    pure_part = diagnostics[diagnostics.index("<h3>pure-dpo") : diagnostics.index("<h3>dpo-sft")]
    sft_part = diagnostics[diagnostics.index("<h3>dpo-sft") :]
    assert "<b>likelihood displacement</b>" in pure_part and "<b>likelihood displacement</b>" not in sft_part
    assert "No known DPO failure pattern" in sft_part
    assert main(["report", str(pure)]) == 0
    printed = capsys.readouterr().out
    assert "DIAGNOSTIC likelihood displacement: " in printed and "\n  try: " in printed
    assert "1 diagnostic finding(s); report: " in printed
    assert page.count("not run") >= 3  # no sweep, no eval, no generations in these runs
    pngs = sorted(p.name for p in (tmp_path / "cmp").glob("*.png"))
    assert "logps_chosen.png" in pngs and "loss.png" in pngs
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert "http://" not in page and "https://" not in page


def test_compare_tells_a_value_not_recorded_from_a_run_not_finished(tmp_path):
    from dpolab.compare import metric_rows
    from dpolab.rundir import RunDir, read_run_files

    runs = {name: synthetic_run(tmp_path, name, chosen_slope=0.1, loss_type=["sigmoid"]) for name in "abc"}
    summary = {"steps": 30, "epochs": 1.0, "runtime_s": 60.0, "pairs_per_s": 4.0, "final": {}, "final_eval": {}}
    (runs["a"] / "summary.json").write_text(json.dumps(summary | {"setup_s": 12.5}))
    (runs["b"] / "summary.json").write_text(json.dumps(summary))  # written before dpolab recorded setup_s
    files = {n: read_run_files(RunDir(d)) for n, d in runs.items()}
    rows = {row[0]: row[1:] for row in metric_rows(files)}
    assert rows["set-up (s)"] == [12.5, "not recorded", "not run"]  # c: no summary, the run did not finish
    assert rows["runtime (s)"] == [60.0, 60.0, "not run"]
    from dpolab.compare import console_table

    assert re.search(r"^set-up \(s\) +12\.5 +not recorded +not run$", console_table(files, []), re.M)


def test_compare_errors(tmp_path, capsys):
    run = synthetic_run(tmp_path, "a", chosen_slope=0.1, loss_type=["sigmoid"])
    assert main(["compare", str(run)]) == 2
    assert "at least two run directories" in capsys.readouterr().err
    assert main(["compare", str(run), str(tmp_path / "nowhere")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    assert not list(tmp_path.glob("compare-*"))  # nothing written


@pytest.fixture
def grid(tmp_path, tiny_config):
    """Three runs of a grid over beta, trained through the CLI, with generations for two of them."""
    data = write_jsonl(tmp_path / "d.jsonl", rows_in_format("messages", 12))
    config = str(tiny_config(data, max_steps=2, eval_holdout=0.25, eval_strategy="steps", eval_steps=2))
    argv = ["train", "--config", config, "--grid", "beta=0.05,0.1,0.2"]
    return tmp_path / "runs", argv


def test_grid_dry_run_lists_the_runs_and_writes_nothing(grid, capsys):
    runs_dir, argv = grid
    assert main([*argv, "--grid", "loss_type=sigmoid,sigmoid+sft", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "grid: 6 runs" in out
    for name in ("tiny-beta_0.05-loss_type_sigmoid", "tiny-beta_0.2-loss_type_sigmoid+sft"):
        assert f"{name}: to train" in out
    assert not runs_dir.exists()


def test_grid_trains_each_combination_resumably_and_compares_them(grid, capsys):
    runs_dir, argv = grid
    assert main(argv) == 0
    names = ["tiny-beta_0.05", "tiny-beta_0.1", "tiny-beta_0.2"]
    for name, beta in zip(names, (0.05, 0.1, 0.2)):
        config = (runs_dir / name / "config.yaml").read_text()
        assert re.search(rf"^beta: {beta}$", config, re.M), name
        assert (runs_dir / name / "summary.json").is_file()
    page = (runs_dir / "tiny-grid" / "compare.html").read_text()
    assert all(name in page for name in names)
    assert "<td>beta</td>" in page  # the one setting that differs

    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing is trained again
    out = capsys.readouterr().out
    assert out.count(": finished") == 3 and "=== grid run" not in out

    prompts = runs_dir.parent / "prompts.txt"
    prompts.write_text("What is 12 + 34?\nSay hello.\n")
    for name in names[:2]:
        models = f"base,{runs_dir / name}"
        assert main(["generate", "--models", models, "--prompts", str(prompts), "--max_new_tokens", "4"]) == 0
    assert main(["compare", *(str(runs_dir / n) for n in names), "--output_dir", str(runs_dir / "cmp")]) == 0
    page = (runs_dir / "cmp" / "compare.html").read_text()
    generations = page[page.index("<h2>Generations") :]
    assert "What is 12 + 34?" in generations and "<th>tiny-beta_0.05</th>" in generations


def test_an_interrupted_grid_run_is_resumed(grid, capsys):
    runs_dir, argv = grid
    assert main([*argv[:-1], "beta=0.1", "--save_strategy", "steps", "--save_steps", "1"]) == 0
    run_dir = runs_dir / "tiny-beta_0.1"
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    capsys.readouterr()
    assert main([*argv[:-1], "beta=0.1", "--save_strategy", "steps", "--save_steps", "1"]) == 0
    assert "tiny-beta_0.1: interrupted" in capsys.readouterr().out
    assert (run_dir / "summary.json").is_file()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_compare_page_renders_in_a_real_browser(tmp_path):
    runs = [synthetic_run(tmp_path, name, slope, ["sigmoid"]) for name, slope in (("a", -0.5), ("b", 0.3))]
    result = subprocess.run([sys.executable, "-m", "dpolab.cli", "compare", *map(str, runs), "--output_dir",
                             str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    dom, console, screenshot = render_in_chromium(tmp_path / "cmp" / "compare.html", tmp_path, "compare")
    assert console == [], console
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) >= 7, loaded
    assert screenshot.stat().st_size > 30_000
