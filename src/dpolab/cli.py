"""`dpolab` entry point: each subcommand parses its arguments and calls one workflow's `run`.

Workflows import torch/transformers themselves, so `dpolab --help` starts at once. A DpolabError (a user
mistake) is printed without a traceback and exits 2.
"""

from __future__ import annotations

import sys

from dpolab.errors import DpolabError

USAGE = """usage: dpolab COMMAND [ARGS]

commands:
  demo                 DPO on SmolLM2-135M-Instruct with generated arithmetic pairs: before -> after, in minutes
  train                train with TRL's DPOTrainer:
                         dpolab train (--config FILE.yaml | --preset NAME) [--field value ...]
  data check SOURCE    validate preference data and print its format, lengths and truncation
  eval --model M       teacher-forced DPO metrics of M against its reference, equal to the trainer's
  sweep RUN_DIR        evaluate the base model and every checkpoint of a run: sweep.csv + sweep.png
  lengthbias PATH      margins against length differences, from an eval.jsonl
  generate --models A,B  the same prompts through several models, side by side (HTML + length statistics)
  report RUN_DIR       curves (PNG), diagnostics and a self-contained report.html
  doctor               check the installed versions, torch build, GPU, numpy ABI, cache and Hub access
  plan                 estimate peak GPU memory by component and a setting that fits the card

`dpolab COMMAND --help` gives each command's options.
"""


def cmd_train(argv: list[str]) -> None:
    if any(arg in ("-h", "--help") for arg in argv):
        from dpolab.config import _make_parser, preset_names

        print("usage: dpolab train (--config FILE.yaml | --preset NAME) [--field value ...]\n")
        print(f"presets: {', '.join(preset_names())}\nfields (TRL's DPOConfig and ModelConfig, plus dpolab's own):\n")
        _make_parser().print_help()
        return
    from dpolab import train
    from dpolab.config import parse_train_args

    train.run(parse_train_args(argv))


def cmd_data(argv: list[str]) -> None:
    from dpolab import data

    data.run_check(data.make_check_parser().parse_args(argv))


def cmd_demo(argv: list[str]) -> None:
    from dpolab import demo

    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: dpolab demo [--field value ...]\n\n{demo.__doc__}\nFields override the `demo` preset.")
        return
    demo.run(argv)


def cmd_eval(argv: list[str]) -> None:
    from dpolab import evaluate

    evaluate.run(evaluate.make_parser().parse_args(argv))


def cmd_sweep(argv: list[str]) -> None:
    from dpolab import evaluate

    evaluate.run_sweep(evaluate.make_sweep_parser().parse_args(argv))


def cmd_lengthbias(argv: list[str]) -> None:
    from dpolab import evaluate

    evaluate.run_lengthbias(evaluate.make_lengthbias_parser().parse_args(argv))


def cmd_generate(argv: list[str]) -> None:
    from dpolab import generate

    generate.run(generate.make_parser().parse_args(argv))


def cmd_report(argv: list[str]) -> None:
    from dpolab import report

    report.run(report.make_parser().parse_args(argv))


def cmd_doctor(argv: list[str]) -> int:
    from dpolab import doctor

    return doctor.run(argv)


def cmd_plan(argv: list[str]) -> int:
    from dpolab import plan

    return plan.run(plan.make_parser().parse_args(argv))


COMMANDS = {
    "doctor": cmd_doctor,
    "plan": cmd_plan,
    "report": cmd_report,
    "generate": cmd_generate,
    "train": cmd_train,
    "data": cmd_data,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "lengthbias": cmd_lengthbias,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"dpolab: unknown command '{argv[0]}'.\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        exit_code = command(argv[1:])
    except DpolabError as error:
        print(f"dpolab {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    return exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
