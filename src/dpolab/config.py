"""Configuration flows one way: dataclass defaults < YAML (a preset or `--config FILE`) < `--field value`.

`dpolab train` (and `demo` and `plan`, which take train's fields) uses TRL's own dataclasses (`DPOConfig`,
`ModelConfig`, parsed like TRL's `TrlParser`) plus dpolab's `ScriptArguments` below. Every other workflow has
one dataclass of its own, parsed by `parse_config` the same way. Every problem found is reported at once,
before any model or data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpolab.errors import DpolabError
from dpolab.rundir import PROVENANCE_KEY

PRESETS_DIR = Path(__file__).parent / "configs"
NONE_WORDS = ("none", "null")  # how an optional field is unset on the command line: `--eval_split none`
BOOL_WORDS = ("true", "false", "1", "0", "yes", "no")

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

# dpolab's defaults where they differ from TRL's: a run should leave TensorBoard curves without being asked;
# reference log-probs are computed once, before training (and cached), not in every step, unless the run sees only a
# part of its data (train.choose_reference_pass decides when the field is not given). Two keep the host from waiting
# for the GPU in every step: a NaN loss is logged as NaN, which stops the run (callbacks.RunGuard), instead of
# transformers' `logging_nan_inf_filter` testing each step's loss on the host (a wait for the whole backward pass);
# and batches are copied to the GPU from pinned memory without blocking (`non_blocking`), where a blocking copy waits
# for the previous step to finish, so the next step's first kernels cannot be queued while the GPU still runs it
# (on a machine without a GPU, neither: `parse_train_args`).
DPOLAB_DEFAULTS = {"report_to": ["tensorboard"], "logging_first_step": True, "precompute_ref_log_probs": True,
                   "logging_nan_inf_filter": False, "accelerator_config": {"non_blocking": True}}  # fmt: skip


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
    drop_invalid_rows: bool = field(
        default=False,
        metadata={
            "help": "Leave out the rows that fail validation (listed in the output and in config.yaml) and train on "
            "the rest. Off: invalid rows are an error that lists them."
        },
    )
    runs_dir: str = field(default="runs", metadata={"help": "Directory that holds one sub-directory per run."})
    resume: bool = field(
        default=False, metadata={"help": "Continue the existing run `runs_dir`/`run_name` from its last checkpoint."}
    )
    fast_path: bool = field(
        default=True,
        metadata={
            "help": "Pack each batch into one row with every prompt computed once for both answers (dpolab's fast "
            "path; equal to TRL's padded computation, tests/test_packing.py). Off, or where the model cannot take "
            "it (the run says why): TRL's padded batches."
        },
    )
    fit_to_memory: bool = field(
        default=True,
        metadata={
            "help": "On a GPU, choose per_device_train_batch_size (keeping per_device_train_batch_size x "
            "gradient_accumulation_steps) and activation_checkpointing with `dpolab plan`'s estimate for the largest "
            "micro-batch this data is likely to give in a run of this length, so the run fits the card; prints what "
            "it chose."
        },
    )
    gpu_memory_gib: float | None = field(
        default=None, metadata={"help": "Memory fit_to_memory plans for (default: what the card has free)."}
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
    name_stem: str = "dpo"  # what an unnamed run's name starts with: the preset's or YAML file's stem
    named: bool = False  # whether run_name was given (in YAML or on the command line)
    given: frozenset = frozenset()  # the fields set in the YAML file or on the command line

    @property
    def run_dir(self) -> Path:
        return Path(self.training.output_dir)

    @classmethod
    def from_argv(cls, argv: list[str]) -> TrainConfig:
        return parse_train_args(argv)

    @staticmethod
    def usage(prog: str) -> str:
        """`dpolab train --help`: the presets and every field (TRL's DPOConfig and ModelConfig, and dpolab's)."""
        return (
            f"usage: {prog} (--config FILE.yaml | --preset NAME) [--field value ...]\n\npresets: "
            f"{', '.join(preset_names())}\nfields (TRL's DPOConfig and ModelConfig, plus dpolab's own):\n\n"
            + _make_parser().format_help()
        )


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


def pop_option(argv: list[str], name: str) -> str | None:
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


def declared_type(key: str) -> str:
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
            elif "list" in declared_type(key) and all(isinstance(item, str) for item in value):
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


def validate(script: ScriptArguments, training, model, require_data: bool = True) -> list[str]:
    """Semantic checks TRL leaves to the first training step; returns every problem found."""
    problems = []
    if require_data and not script.dataset_name:
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
    if require_data and training.eval_strategy != "no" and not (script.eval_split or script.eval_holdout):
        problems.append(
            f"eval_strategy is '{training.eval_strategy}' but there is no eval data: name a split of the dataset "
            "(`--eval_split test`) or hold out a fraction of the training split (`--eval_holdout 0.05`)."
        )
    if script.merge_lora and not model.use_peft:
        problems.append("merge_lora merges a LoRA adapter: it needs use_peft true.")
    if training.run_name and not re.fullmatch(r"[\w.+-]+", training.run_name):
        problems.append(f"run_name '{training.run_name}' must be a plain directory name (letters, digits, . _ + -).")
    return problems


def parse_train_args(argv: list[str], require_data: bool = True) -> TrainConfig:
    """Resolve `dpolab train` arguments: defaults < preset or `--config` YAML < `--field value`.

    `require_data=False` (for `dpolab plan`) accepts a config without a dataset.
    """
    argv = list(argv)
    config_file = pop_option(argv, "--config")
    preset = pop_option(argv, "--preset")
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
    for name in _optional_script_fields():  # `--eval_split none` unsets a preset's split
        if isinstance(getattr(namespace, name), str) and getattr(namespace, name).lower() in NONE_WORDS:
            setattr(namespace, name, None)
    named, name_stem = namespace.run_name is not None, path.stem if path else "dpo"
    namespace.run_name = namespace.run_name or f"{name_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    namespace.output_dir = str(Path(namespace.runs_dir) / namespace.run_name)
    if namespace.bf16 is None:  # TRL turns an unset bf16 into True, which fails outright on a CPU-only machine
        namespace.bf16 = _bf16_supported() and not namespace.fp16
    given = frozenset(yaml_values) | {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    if not _accelerator_available():  # nothing to pin memory for or copy to: torch and transformers would warn
        if "dataloader_pin_memory" not in given:
            namespace.dataloader_pin_memory = False
        if "accelerator_config" not in given:
            namespace.accelerator_config = {**namespace.accelerator_config, "non_blocking": False}
    script, training, model = _to_dataclasses(parser, namespace)
    problems = validate(script, training, model, require_data)
    if problems:
        raise DpolabError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return TrainConfig(script=script, training=training, model=model, source=origin, name_stem=name_stem, named=named,
                       given=given)  # fmt: skip


def _optional_script_fields() -> list[str]:
    hints = typing.get_type_hints(ScriptArguments)
    return [name for name, hint in hints.items() if type(None) in typing.get_args(hint)]


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator_available() -> bool:
    import torch

    return torch.accelerator.is_available()


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


# --- every other workflow: one dataclass each, parsed the same way ----------------------------------------------


@dataclass(frozen=True)
class Option:
    """One field of a workflow dataclass as a command-line option."""

    name: str
    kind: type  # str, int, float or bool (the item type for lists)
    is_list: bool
    optional: bool  # None is a value: `--field none`
    required: bool
    positional: bool
    help: str
    choices: tuple | None


def options(config_class) -> list[Option]:
    """The options of a workflow dataclass, from its annotations and each field's `metadata`."""
    hints = typing.get_type_hints(config_class)
    result = []
    for item in dataclasses.fields(config_class):
        if not item.init:
            continue
        hint, optional = hints[item.name], False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            optional, hint = len(members) < len(typing.get_args(hint)), members[0]
        is_list = typing.get_origin(hint) is list
        kind = typing.get_args(hint)[0] if is_list else hint
        required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
        result.append(Option(
            name=item.name, kind=kind, is_list=is_list, optional=optional, required=required,
            positional=bool(item.metadata.get("positional")), help=item.metadata.get("help", ""),
            choices=tuple(item.metadata["choices"]) if "choices" in item.metadata else None,
        ))  # fmt: skip
    return sorted(result, key=lambda option: (not option.positional, not option.required))  # what must be given first


def _convert(option: Option, text):
    """One command-line or YAML value in the option's type; ValueError says what was expected."""
    if option.optional and (text is None or (isinstance(text, str) and text.lower() in NONE_WORDS)):
        return None
    if option.kind is bool:
        if isinstance(text, bool):
            return text
        if str(text).lower() in BOOL_WORDS:
            return str(text).lower() in BOOL_WORDS[::2]
        raise ValueError(f"expected true or false, got {text!r}")
    try:
        value = option.kind(text) if not isinstance(text, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise ValueError(f"expected {'an' if option.kind is int else 'a'} {option.kind.__name__}, got {text!r}")
    if option.choices and value not in option.choices:
        raise ValueError(f"expected one of {', '.join(map(str, option.choices))}, got {text!r}")
    return value


def _assign(option: Option, raw: list, origin: str, values: dict, problems: list[str]) -> None:
    where = f"{origin}: --{option.name}"
    if not raw and option.kind is bool:
        raw = [True]  # a bare flag: `--do_sample`
    if not raw:
        problems.append(f"{where} needs a value.")
        return
    if len(raw) > 1 and not option.is_list:
        problems.append(f"{where} takes one value, got {len(raw)}: {' '.join(map(str, raw))}.")
        return
    try:
        converted = [_convert(option, item) for item in raw]
    except ValueError as error:
        problems.append(f"{where}: {error}.")
        return
    if option.is_list:
        values[option.name] = None if converted == [None] else converted
    else:
        values[option.name] = converted[0]


def _unknown_option(name: str, known: list[str], origin: str) -> str:
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
    did_you_mean = f" Did you mean '--{hint[0]}'?" if hint else ""
    return f"{origin}: unknown option '--{name}'.{did_you_mean}"


def parse_config(config_class, argv: list[str]):
    """A workflow's dataclass from `[--config FILE.yaml] [positional ...] [--field value ...]`.

    Values resolve as the dataclass defaults < the YAML file < the command line; every problem is reported at
    once in one DpolabError. A bare boolean flag means true; `--field none` unsets an optional field.
    """
    argv = list(argv)
    config_file = pop_option(argv, "--config")
    all_options = options(config_class)
    by_name = {option.name: option for option in all_options}
    known = sorted(by_name)
    values, problems = {}, []
    if config_file:
        for key, value in load_yaml(config_file).items():
            if key not in by_name or by_name[key].positional:
                problems.append(_unknown_option(key, known, config_file).replace("'--", "'"))
                continue
            raw = value if isinstance(value, list) else [value]
            _assign(by_name[key], raw, config_file, values, problems)
    positional = [option for option in all_options if option.positional]
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--"):
            name, _, inline = token[2:].partition("=")
            option = by_name.get(name)
            raw = [inline] if inline else []
            index += 1
            while not inline and index < len(argv) and not argv[index].startswith("--"):
                if option is not None and option.kind is bool and (raw or argv[index].lower() not in BOOL_WORDS):
                    break  # a bare flag followed by a positional value
                raw.append(argv[index])
                index += 1
            if option is None or option.positional:
                problems.append(_unknown_option(name, known, "command line"))
            else:
                _assign(option, raw, "command line", values, problems)
            continue
        if positional and positional[0].is_list:  # a list takes every remaining positional value
            values.setdefault(positional[0].name, []).append(token)
        elif positional:
            _assign(positional.pop(0), [token], "command line", values, problems)
        else:
            problems.append(f"command line: unexpected value '{token}' (options are written `--field value`).")
        index += 1
    for option in all_options:
        if option.required and option.name not in values:
            label = option.name.upper() if option.positional else f"--{option.name}"
            problems.append(f"{label} is required ({option.help})." if option.help else f"{label} is required.")
    if problems:
        raise DpolabError("Invalid options:\n  - " + "\n  - ".join(problems))
    return make_config(config_class, **values)


def make_config(config_class, **values):
    """A workflow config built in code, with `values` counted as given (as if typed on the command line)."""
    config = config_class(**values)
    object.__setattr__(config, "_given", frozenset(values))
    return config


def given_fields(config) -> frozenset[str]:
    """The fields of a workflow config that the user set (in YAML or on the command line), even to None."""
    return getattr(config, "_given", frozenset())


def trl_default(name: str):
    """TRL's own default for a `DPOConfig` or `ModelConfig` field (imports TRL: call it inside a workflow)."""
    from trl import DPOConfig, ModelConfig

    for dataclass_type in (DPOConfig, ModelConfig):
        for item in dataclasses.fields(dataclass_type):
            if item.name == name:
                return item.default_factory() if item.default is dataclasses.MISSING else item.default
    raise KeyError(name)


def config_usage(config_class, prog: str) -> str:
    """`--help` text: the dataclass's docstring and each option with its help, type and default."""
    import inspect

    positional = " ".join(
        option.name.upper() if option.required else f"[{option.name.upper()}]"
        for option in options(config_class)
        if option.positional
    )
    lines = [f"usage: {prog} {positional + ' ' if positional else ''}[--config FILE.yaml] [--field value ...]", "",
             inspect.cleandoc(config_class.__doc__ or ""), ""]  # fmt: skip
    defaults = {item.name: item for item in dataclasses.fields(config_class)}
    for option in options(config_class):
        item = defaults[option.name]
        default = item.default if item.default is not dataclasses.MISSING else None
        kind = f"{option.kind.__name__}{' ...' if option.is_list else ''}"
        label = option.name.upper() if option.positional else f"--{option.name} {kind.upper()}"
        suffix = "" if option.required or default in (None, False) else f" (default: {default})"
        lines.append(f"  {label}\n      {option.help}{suffix}")
    lines.append("\n  --config FILE.yaml\n      read any of these fields from a YAML mapping (the command line wins)")
    return "\n".join(lines)
