"""`dpolab train ... --grid beta=0.05,0.1,0.2 [--grid loss_type=sigmoid,sigmoid+sft]`: one run per combination.

Runs are named after their values (`<name>-beta_0.05-loss_type_sigmoid+sft`), trained one after another, and
compared at the end (`dpolab compare`). Re-running the same command skips finished runs and resumes interrupted
ones from their last checkpoint. `--dry_run` lists the runs. In a value, `+` joins list items (a loss_type of
sigmoid and sft is `sigmoid+sft`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from dpolab.errors import DpolabError
from dpolab.rundir import RunDir

GRID_FLAG = "--grid"


@dataclass
class GridRun:
    name: str
    values: dict[str, str]  # field -> value as given on the command line
    argv: list[str]  # the `dpolab train` arguments of this run


@dataclass
class GridConfig:
    """`dpolab train` with --grid FIELD=V1,V2,...: one run per combination of the values, then a comparison."""

    runs: list[GridRun]
    runs_dir: Path
    name: str
    dry_run: bool = False

    @classmethod
    def from_argv(cls, argv: list[str]) -> GridConfig:
        from dpolab.config import declared_type, parse_train_args, pop_option

        argv = list(argv)
        axes, dry_run = [], False
        while (spec := pop_option(argv, GRID_FLAG)) is not None:
            axes.append(parse_axis(spec))
        if "--dry_run" in argv:
            argv.remove("--dry_run")
            dry_run = True
        if not axes:
            raise DpolabError("--grid needs FIELD=V1,V2,... (e.g. --grid beta=0.05,0.1,0.2).")
        base = parse_train_args(argv)  # the shared settings, checked once before anything runs
        name = base.training.run_name if base.named else base.name_stem
        runs = []
        for combination in itertools.product(*(values for _, values in axes)):
            values = {field: value for (field, _), value in zip(axes, combination, strict=True)}
            run_name = "-".join([name, *(f"{field}_{value}" for field, value in values.items())])
            run_argv = [*argv, "--run_name", run_name]
            for field, value in values.items():
                run_argv += [f"--{field}", *(value.split("+") if "list" in declared_type(field) else [value])]
            parse_train_args(run_argv)  # every combination is a valid config before the first one trains
            runs.append(GridRun(run_name, values, run_argv))
        return cls(runs=runs, runs_dir=Path(base.script.runs_dir), name=name, dry_run=dry_run)

    @staticmethod
    def usage(prog: str) -> str:
        head = f"usage: {prog} (--config FILE.yaml | --preset NAME) --grid FIELD=V1,V2 [--grid ...] [--dry_run]"
        return f"{head}\n\n{__doc__}"


def parse_axis(spec: str) -> tuple[str, list[str]]:
    """`beta=0.05,0.1` -> ("beta", ["0.05", "0.1"])."""
    field, _, values = spec.partition("=")
    items = [value.strip() for value in values.split(",") if value.strip()]
    if not field or not items:
        raise DpolabError(f"--grid {spec!r}: expected FIELD=V1,V2,... (e.g. --grid beta=0.05,0.1,0.2).")
    if len(set(items)) < len(items):
        raise DpolabError(f"--grid {spec!r}: a value is repeated.")
    return field.strip(), items


def run(config: GridConfig) -> Path | None:
    """Train each run that is not finished (resuming interrupted ones), then compare them all."""
    from dpolab import compare, train
    from dpolab.config import parse_train_args

    print(f"grid: {len(config.runs)} runs in {config.runs_dir}")
    for index, grid_run in enumerate(config.runs, start=1):
        state = run_state(RunDir(config.runs_dir / grid_run.name))
        print(f"  [{index}/{len(config.runs)}] {grid_run.name}: {state}")
    if config.dry_run:
        return None
    for grid_run in config.runs:
        run_dir = RunDir(config.runs_dir / grid_run.name)
        state = run_state(run_dir)
        if state == "finished":
            continue
        if state == "started, no checkpoint":
            raise DpolabError(
                f"{run_dir.path} was started but has no summary.json and no checkpoint to resume from. Delete it "
                f"to train it again, then re-run the same command (finished runs are skipped)."
            )
        argv = grid_run.argv + (["--resume"] if state == "interrupted" else [])
        print(f"\n=== grid run {grid_run.name} ({', '.join(f'{k}={v}' for k, v in grid_run.values.items())}) ===")
        train.run(parse_train_args(argv))
        release_memory()
    paths = [str(config.runs_dir / grid_run.name) for grid_run in config.runs]
    if len(paths) < 2:
        return None  # a grid of one run has nothing to compare
    output = config.runs_dir / f"{config.name}-grid"
    return compare.run(compare.CompareConfig(runs=paths, output_dir=str(output)))


def run_state(run_dir: RunDir) -> str:
    if run_dir.summary_file.is_file():
        return "finished"
    if not run_dir.path.exists():
        return "to train"
    return "interrupted" if run_dir.last_complete_checkpoint() else "started, no checkpoint"


def release_memory() -> None:
    """Free the last run's model and optimizer before the next one loads its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
