"""`dpolab` entry point: a table of subcommand -> (workflow module, its config dataclass).

Each workflow module exposes `run(config)`; its config is parsed here the one way every command shares
(`config.parse_config`: YAML < `--field value`, every problem at once), or, for the commands that take
`dpolab train`'s TRL fields, by the config class's own `from_argv`. Workflows import torch/transformers
themselves, so `--help` starts at once. A DpolabError (a user mistake) is printed without a traceback and exits 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from dpolab.errors import DpolabError

# command -> (module, config class, one line of help)
COMMANDS = {
    "demo": ("dpolab.demo", "DemoConfig",
             "DPO on SmolLM2-135M-Instruct with generated arithmetic pairs: before -> after, in minutes"),
    "train": ("dpolab.train", "dpolab.config.TrainConfig",
              "train with TRL's DPOTrainer: dpolab train (--config FILE.yaml | --preset NAME) [--field value ...]"),
    "train --grid": ("dpolab.grid", "GridConfig",
                     "one run per combination: dpolab train ... --grid beta=0.05,0.1 [--grid ...], then compare"),
    "data check": ("dpolab.datacheck", "DataCheckConfig",
                   "validate preference data and print its format, lengths and truncation"),
    "eval": ("dpolab.evaluate", "EvalConfig",
             "teacher-forced DPO metrics of --model against its reference, equal to the trainer's"),
    "sweep": ("dpolab.sweep", "SweepConfig", "evaluate the base model and every checkpoint of a run: sweep.csv/png"),
    "lengthbias": ("dpolab.lengthbias", "LengthBiasConfig", "margins against length differences, from an eval.jsonl"),
    "generate": ("dpolab.generate", "GenerateConfig",
                 "the same prompts through several models, side by side (HTML + length statistics)"),
    "judge": ("dpolab.judge", "JudgeConfig",
              "reward-model win rates of a run's models against its base, length-controlled: judge.json"),
    "report": ("dpolab.report", "ReportConfig", "curves (PNG), diagnostics and a self-contained report.html"),
    "compare": ("dpolab.compare", "CompareConfig", "runs side by side: settings that differ, metrics, curves overlaid"),
    "doctor": ("dpolab.doctor", "DoctorConfig",
               "check the installed versions, torch build, GPU, numpy ABI, cache and Hub access"),
    "plan": ("dpolab.plan", "PlanConfig", "estimate peak GPU memory by component and a setting that fits the card"),
}  # fmt: skip


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}}{text}" for name, (_, _, text) in COMMANDS.items()]
    return (
        "usage: dpolab COMMAND [ARGS]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\n`dpolab COMMAND --help` gives each command's options.")
    )


def config_class(module, name: str):
    if "." in name:
        module_name, _, name = name.rpartition(".")
        module = importlib.import_module(module_name)
    return getattr(module, name)


def main(argv: list[str] | None = None) -> int:
    from dpolab.config import config_usage, parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    words = 2 if argv[0] == "data" else 1  # `data check` is one command of two words
    name, argv = " ".join(argv[:words]), argv[words:]
    if name == "train" and any(arg.split("=")[0] == "--grid" for arg in argv):
        name = "train --grid"
    if name not in COMMANDS:
        print(f"dpolab: unknown command '{name}'.\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, class_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        config_type = config_class(module, class_name)
        if any(arg in ("-h", "--help") for arg in argv):
            text = config_type.usage(f"dpolab {name}") if hasattr(config_type, "usage") else None
            print(text or config_usage(config_type, f"dpolab {name}"))
            return 0
        config = config_type.from_argv(argv) if hasattr(config_type, "from_argv") else parse_config(config_type, argv)
        exit_code = module.run(config)
    except DpolabError as error:
        print(f"dpolab {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`dpolab ... --help | head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 1
    return exit_code if isinstance(exit_code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
