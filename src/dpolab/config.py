"""Configuration flows one way: dataclass defaults < YAML (a preset or `--config FILE`) < `--field value`.

The fields are TRL's own (`DPOConfig`, `ModelConfig`, parsed like TRL's `TrlParser`) plus dpolab's
`ScriptArguments` below. Every problem found is reported at once, before any model or data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpolab.errors import DpolabError

PRESETS_DIR = Path(__file__).parent / "configs"
# config.yaml in a run directory carries versions etc. under this key; loading it back skips the key.
PROVENANCE_KEY = "dpolab_provenance"

# The values TRL 1.16 `DPOTrainer._compute_loss` accepts; anything else fails deep inside the first step.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip

# Names users carry over from older TRL releases or other scripts, with what to write instead.
RENAMED_KEYS = {
    "tokenizer": "`tokenizer` became `processing_class` in TRL 0.12; dpolab loads the tokenizer from "
    "`model_name_or_path`, so drop the key",
    "use_liger_loss": "`use_liger_loss` was renamed `use_liger_kernel` in TRL 0.25",
    "max_prompt_length": "`max_prompt_length` was removed in TRL 0.29: `max_length` now bounds prompt + completion",
    "max_completion_length": "`max_completion_length` was removed in TRL 0.29: `max_length` now bounds prompt + "
    "completion",
    "warmup_ratio": "transformers 5 removed `warmup_ratio`: `warmup_steps` takes a fraction < 1 instead (e.g. 0.1)",
    "evaluation_strategy": "`evaluation_strategy` was renamed `eval_strategy` in transformers 4.41",
    "dataset_train_split": "dpolab calls TRL's `dataset_train_split` `train_split`",
    "dataset_test_split": "dpolab calls TRL's `dataset_test_split` `eval_split`",
    "output_dir": "dpolab writes every run to `runs_dir`/`run_name`: set those instead of `output_dir`",
}

# dpolab's defaults where they differ from TRL's: a run should leave TensorBoard curves without being asked.
DPOLAB_DEFAULTS = {"report_to": ["tensorboard"], "logging_first_step": True}


@dataclass
class ScriptArguments:
    """dpolab's own fields: where the preference pairs come from and where the run goes."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data: a Hub dataset id, a .jsonl/.json/.parquet/.csv file, a directory of such files "
            "(one per split, named after the split), or a `save_to_disk` directory."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (e.g. `test`)."})
    eval_holdout: float = field(
        default=0.0,
        metadata={"help": "Fraction of the training split held out for evaluation when there is no `eval_split`."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (if any)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the preferred answer."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column holding the dispreferred answer."})
    runs_dir: str = field(default="runs", metadata={"help": "Directory that holds one sub-directory per run."})
    resume: bool = field(
        default=False, metadata={"help": "Continue the existing run `runs_dir`/`run_name` from its last checkpoint."}
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With use_peft: also write final/merged, the base model with the adapter merged in."},
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Load a model stored only as pickle (pytorch_model.bin), which can run code when loaded. Off: "
            "convert it to safetensors instead."
        },
    )


@dataclass
class TrainConfig:
    """Everything `dpolab train` needs, resolved."""

    script: ScriptArguments
    training: DPOConfig  # noqa: F821 (trl is imported lazily)
    model: ModelConfig  # noqa: F821
    source: str  # the preset or YAML file the values came from, or "defaults"

    @property
    def run_dir(self) -> Path:
        return Path(self.training.output_dir)


class _ArgumentError(Exception):
    pass


def _make_parser():
    from transformers import HfArgumentParser
    from trl import DPOConfig, ModelConfig

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse would print usage and exit; we collect the problem instead
            raise _ArgumentError(message)

    parser = Parser((ScriptArguments, DPOConfig, ModelConfig), allow_abbrev=False, exit_on_error=False)
    parser.set_defaults(**DPOLAB_DEFAULTS)
    return parser


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise DpolabError(f"Unknown preset '{name}'.{did_you_mean} Presets: {', '.join(preset_names())}.")
    return path


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file, a syntax error (with its line) or a non-mapping is a DpolabError."""
    path = Path(path)
    if not path.is_file():
        raise DpolabError(f"Config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DpolabError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise DpolabError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DpolabError(f"{path}: expected a mapping of `field: value`, got a {type(values).__name__}.")
    return values


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove `--name VALUE` or `--name=VALUE` from argv and return VALUE."""
    for index, arg in enumerate(argv):
        if arg == name:
            if index + 1 >= len(argv):
                raise DpolabError(f"{name} needs a value.")
            value = argv[index + 1]
            del argv[index : index + 2]
            return value
        if arg.startswith(name + "="):
            del argv[index]
            return arg.split("=", 1)[1]
    return None


def _unknown_key_message(key: str, known: list[str], origin: str) -> str:
    if key in RENAMED_KEYS:
        return f"{origin}: unknown key '{key}': {RENAMED_KEYS[key]}."
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
    return f"{origin}: unknown key '{key}'.{did_you_mean} (`dpolab train --help` lists every field.)"


def _declared_type(key: str) -> str:
    """A field's annotation as written in its dataclass (HfArgumentParser rewrites `Field.type` in place)."""
    from trl import DPOConfig, ModelConfig

    for dataclass_type in (ScriptArguments, DPOConfig, ModelConfig):
        for klass in dataclass_type.__mro__:
            if key in getattr(klass, "__annotations__", {}):
                return str(klass.__annotations__[key])
    return ""


def _scalar_to_arg(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _yaml_to_argv(values: dict, parser, origin: str, problems: list[str]) -> tuple[list[str], dict]:
    """Turn YAML values into `--key value` strings so argparse applies the same types as on the CLI.

    Returns the argv and the values argparse cannot express (null, an empty list, a list for a field like
    `report_to` that takes a string or a list), which become parser defaults as in TRL's `TrlParser`.
    """
    from trl import DPOConfig

    dict_fields = DPOConfig._VALID_DICT_FIELDS  # the fields TrainingArguments parses from a JSON string
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    argv, direct = [], {}
    for key, value in values.items():
        if key == PROVENANCE_KEY:
            continue
        action = actions.get(key)
        if action is None or key in ("help",):
            problems.append(_unknown_key_message(key, sorted(actions), origin))
        elif value is None or value == []:
            direct[key] = value
        elif isinstance(value, dict):
            if key in dict_fields:
                argv += [f"--{key}", json.dumps(value)]
            else:
                problems.append(f"{origin}: '{key}' takes a single value, got a mapping {value!r}.")
        elif isinstance(value, list):
            if action.nargs in ("+", "*"):
                argv += [f"--{key}", *(_scalar_to_arg(item) for item in value)]
            elif "list" in _declared_type(key) and all(isinstance(item, str) for item in value):
                direct[key] = value
            else:
                problems.append(f"{origin}: '{key}' takes a single value, got a list {value!r}.")
        else:
            argv += [f"--{key}", _scalar_to_arg(value)]
    return argv, direct


def _check_argv(parser, argv: list[str], origin: str, problems: list[str]) -> None:
    """Parse argv alone to find type errors and unknown flags, attributed to where they came from."""
    known = sorted(action.dest for action in parser._actions if action.option_strings)
    try:
        _, unknown = parser.parse_known_args(argv)
    except (_ArgumentError, argparse.ArgumentError) as error:
        problems.append(f"{origin}: {error}")
        return
    after_unknown_flag = False
    for arg in unknown:
        if arg.startswith("--"):
            problems.append(_unknown_key_message(arg[2:].split("=", 1)[0], known, origin))
            after_unknown_flag = "=" not in arg
        elif arg.startswith("-"):
            problems.append(f"{origin}: unknown option '{arg}'.")
        elif not after_unknown_flag:  # the values of an unknown flag are not worth a second message
            problems.append(f"{origin}: unexpected value '{arg}' (options are written `--field value`).")


def validate(script: ScriptArguments, training, model) -> list[str]:
    """Semantic checks TRL leaves to the first training step; returns every problem found."""
    problems = []
    if not script.dataset_name:
        problems.append("dataset_name is not set: give `--dataset_name SOURCE`, a `--config` file or a `--preset`.")
    if not model.model_name_or_path:
        problems.append("model_name_or_path is not set: give `--model_name_or_path ID_OR_DIR`.")
    if not training.beta > 0:
        problems.append(f"beta must be > 0 (it scales the implicit reward), got {training.beta}.")
    for loss_type in training.loss_type:
        if loss_type not in LOSS_TYPES:
            hint = difflib.get_close_matches(loss_type, LOSS_TYPES, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            problems.append(f"loss_type: unknown '{loss_type}'.{did_you_mean} Known: {', '.join(LOSS_TYPES)}.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(training, name)}.")
    if training.learning_rate < 0:
        problems.append(f"learning_rate must be >= 0, got {training.learning_rate}.")
    if training.max_length is not None and training.max_length < 2:
        problems.append(f"max_length must be >= 2 tokens (or null for no truncation), got {training.max_length}.")
    if not 0 <= script.eval_holdout < 1:
        problems.append(f"eval_holdout is a fraction in [0, 1), got {script.eval_holdout}.")
    if script.eval_split and script.eval_holdout:
        problems.append("eval_split and eval_holdout are both set: evaluate on a split or on a held-out fraction.")
    if training.eval_strategy != "no" and not (script.eval_split or script.eval_holdout):
        problems.append("eval_strategy is set but there is no eval data: set `eval_split` or `eval_holdout`.")
    if script.merge_lora and not model.use_peft:
        problems.append("merge_lora merges a LoRA adapter: it needs use_peft true.")
    if training.run_name and not re.fullmatch(r"[\w.+-]+", training.run_name):
        problems.append(f"run_name '{training.run_name}' must be a plain directory name (letters, digits, . _ + -).")
    return problems


def parse_train_args(argv: list[str]) -> TrainConfig:
    """Resolve `dpolab train` arguments: defaults < preset or `--config` YAML < `--field value`."""
    argv = list(argv)
    config_file = _pop_option(argv, "--config")
    preset = _pop_option(argv, "--preset")
    if config_file and preset:
        raise DpolabError("Give either --config FILE or --preset NAME, not both.")
    path = preset_path(preset) if preset else Path(config_file) if config_file else None
    yaml_values = load_yaml(path) if path else {}
    origin = f"preset '{preset}'" if preset else str(path) if path else "defaults"

    parser = _make_parser()
    problems: list[str] = []
    if "output_dir" in yaml_values or any(arg.split("=")[0] == "--output_dir" for arg in argv):
        problems.append(RENAMED_KEYS["output_dir"] + ".")
    yaml_argv, direct = _yaml_to_argv(yaml_values, parser, origin, problems)
    _check_argv(parser, yaml_argv, origin, problems)
    _check_argv(parser, argv, "command line", problems)
    if problems:
        raise DpolabError("Invalid configuration:\n  - " + "\n  - ".join(problems))

    parser.set_defaults(**direct)
    namespace = parser.parse_args(yaml_argv + argv)
    namespace.run_name = namespace.run_name or f"{path.stem if path else 'dpo'}-{time.strftime('%Y%m%d-%H%M%S')}"
    namespace.output_dir = str(Path(namespace.runs_dir) / namespace.run_name)
    if namespace.bf16 is None:  # TRL turns an unset bf16 into True, which fails outright on a CPU-only machine
        namespace.bf16 = _bf16_supported() and not namespace.fp16
    script, training, model = _to_dataclasses(parser, namespace)
    problems = validate(script, training, model)
    if problems:
        raise DpolabError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return TrainConfig(script=script, training=training, model=model, source=origin)


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _to_dataclasses(parser, namespace) -> tuple:
    values = vars(namespace)
    instances = []
    for dataclass_type in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        try:
            with warnings.catch_warnings():
                # TRL's own default (gradient_checkpointing=True) trips transformers' rename warning on every run.
                warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated")
                instances.append(dataclass_type(**{k: v for k, v in values.items() if k in names}))
        except (ValueError, TypeError) as error:
            hint = " On a machine without bf16 support set `bf16: false`." if "bf16" in str(error) else ""
            raise DpolabError(f"Invalid configuration ({dataclass_type.__name__}): {error}{hint}") from None
    return tuple(instances)


def resolved_config(config: TrainConfig, provenance: dict) -> dict:
    """Every field's final value, flat (loadable again with `--config`), plus provenance under its own key."""
    values = dataclasses.asdict(config.script)
    values.update(dataclasses.asdict(config.model))
    for key, value in config.training.to_dict().items():
        help_text = config.training.__dataclass_fields__[key].metadata.get("help", "")
        masked = isinstance(value, str) and value.startswith("<") and key.endswith("_token")
        if masked or help_text.startswith("Deprecated") or key in ("output_dir",):
            continue
        values[key] = value
    values[PROVENANCE_KEY] = provenance
    return values
