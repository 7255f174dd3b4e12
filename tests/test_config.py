"""Config resolution: defaults < YAML < CLI, TRL's field names, and every mistake reported with its fix."""

import pytest
import yaml

from dpolab.config import PROVENANCE_KEY, parse_train_args, preset_names, resolved_config
from dpolab.errors import DpolabError

REQUIRED = {"model_name_or_path": "some/model", "dataset_name": "data.jsonl"}


def write(tmp_path, values, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values) if isinstance(values, dict) else values)
    return str(path)


def parse_error(argv) -> str:
    with pytest.raises(DpolabError) as error:
        parse_train_args(argv)
    return str(error.value)


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    path = write(tmp_path, {**REQUIRED, "beta": 0.25, "learning_rate": "5e-6", "max_length": 512})
    config = parse_train_args(["--config", path, "--beta", "0.5", "--run_name", "r"])
    assert config.training.beta == 0.5  # CLI beats YAML
    assert config.training.learning_rate == 5e-6  # YAML (a string PyYAML leaves unparsed) beats the default
    assert config.training.max_length == 512
    assert config.training.loss_type == ["sigmoid"]  # TRL's default
    assert config.training.report_to == ["tensorboard"]  # dpolab's default
    assert config.training.output_dir == "runs/r"


def test_false_and_zero_on_the_cli_win_over_yaml(tmp_path):
    path = write(tmp_path, {**REQUIRED, "eval_on_start": True, "eval_holdout": 0.2, "weight_decay": 0.1})
    config = parse_train_args(
        ["--config", path, "--eval_on_start", "false", "--eval_holdout", "0", "--weight_decay", "0"]
    )
    assert config.training.eval_on_start is False
    assert config.script.eval_holdout == 0.0
    assert config.training.weight_decay == 0.0


def test_lists_nulls_and_mappings_from_yaml_and_cli(tmp_path):
    path = write(
        tmp_path,
        {
            **REQUIRED,
            "loss_type": ["sigmoid", "sft"],
            "max_length": None,
            "model_init_kwargs": {"attn_implementation": "eager"},
        },
    )
    config = parse_train_args(["--config", path])
    assert config.training.loss_type == ["sigmoid", "sft"]
    assert config.training.max_length is None
    assert config.training.model_init_kwargs == {"attn_implementation": "eager"}
    config = parse_train_args(["--config", path, "--loss_type", "ipo"])
    assert config.training.loss_type == ["ipo"]


def test_run_name_defaults_to_config_stem_and_time(tmp_path):
    config = parse_train_args(["--config", write(tmp_path, REQUIRED, name="myexp.yaml")])
    assert config.training.run_name.startswith("myexp-")
    assert config.run_dir.parent.name == "runs"


def test_unknown_keys_get_did_you_mean_and_renames_get_their_new_name(tmp_path):
    path = write(tmp_path, {**REQUIRED, "learning_rat": 1e-5, "max_prompt_length": 128})
    message = parse_error(["--config", path, "--bta", "0.2"])
    assert "unknown key 'learning_rat'. Did you mean 'learning_rate'?" in message
    assert "max_prompt_length` was removed in TRL 0.29" in message
    assert "command line: unknown key 'bta'. Did you mean 'beta'?" in message
    assert "unexpected value" not in message  # the value of an unknown flag is not a second problem


def test_wrong_types_name_the_key_and_the_value(tmp_path):
    message = parse_error(["--config", write(tmp_path, {**REQUIRED, "beta": "high"})])
    assert "c.yaml" in message and "--beta" in message and "'high'" in message
    message = parse_error(["--config", write(tmp_path, {**REQUIRED, "beta": [0.1, 0.2]})])
    assert "'beta' takes a single value, got a list" in message
    message = parse_error(["--config", write(tmp_path, {**REQUIRED}), "--per_device_train_batch_size", "two"])
    assert "command line" in message and "invalid int value: 'two'" in message


def test_semantic_problems_are_reported_together(tmp_path):
    path = write(tmp_path, {**REQUIRED, "beta": -0.1, "loss_type": ["sigmod"], "per_device_train_batch_size": 0})
    message = parse_error(["--config", path])
    assert "beta must be > 0" in message and "-0.1" in message
    assert "loss_type: unknown 'sigmod'. Did you mean 'sigmoid'?" in message
    assert "per_device_train_batch_size must be >= 1, got 0" in message


def test_missing_model_and_data_and_eval_without_data(tmp_path):
    message = parse_error(["--config", write(tmp_path, {"eval_strategy": "steps"})])
    assert "dataset_name is not set" in message
    assert "model_name_or_path is not set" in message
    assert "there is no eval data: name a split of the dataset (`--eval_split test`)" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "beta: 0.1\nloss_type: [sigmoid\nmax_length: 12\n")
    message = parse_error(["--config", path])
    assert "YAML syntax error" in message and "line 3" in message


def test_config_file_and_preset_errors(tmp_path):
    assert "Config file not found" in parse_error(["--config", str(tmp_path / "nope.yaml")])
    message = parse_error(["--preset", "smok"])
    assert "Unknown preset 'smok'. Did you mean 'smoke'?" in message and "demo" in message
    assert "not both" in parse_error(["--preset", "smoke", "--config", write(tmp_path, REQUIRED)])
    assert "expected a mapping" in parse_error(["--config", write(tmp_path, "- a\n- b\n")])


def test_output_dir_is_refused_in_favour_of_runs_dir(tmp_path):
    message = parse_error(["--config", write(tmp_path, REQUIRED), "--output_dir", "x"])
    assert "runs_dir" in message and "run_name" in message


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_says_how_to_run_it(preset):
    from dpolab.config import preset_path

    header = preset_path(preset).read_text().splitlines()[:3]
    assert any("dpolab " in line for line in header), f"{preset}.yaml header must show the command that runs it"
    config = parse_train_args(["--preset", preset, "--model_name_or_path", "m", "--dataset_name", "d"])
    assert config.training.beta > 0


def test_reference_presets_match_the_reference_job():
    smoke = parse_train_args(["--preset", "smoke"])
    assert smoke.model.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert smoke.script.dataset_name == "trl-lib/ultrafeedback_binarized"
    assert smoke.training.max_steps == 60 and smoke.training.logging_steps == 5
    full = parse_train_args(["--preset", "full"])
    assert full.training.num_train_epochs == 1 and full.training.max_steps == -1
    assert full.script.eval_split == "test" and full.training.eval_strategy == "steps"
    assert full.training.save_strategy == "steps"


def test_resolved_config_loads_back_to_the_same_values(tmp_path):
    path = write(tmp_path, {**REQUIRED, "beta": 0.3, "loss_type": ["sigmoid", "sft"], "max_length": None})
    config = parse_train_args(["--config", path, "--run_name", "x"])
    resolved = resolved_config(config, {"versions": {"trl": "1.16.0"}})
    assert resolved[PROVENANCE_KEY]["versions"]["trl"] == "1.16.0"
    saved = write(tmp_path, yaml.safe_dump(resolved), name="resolved.yaml")
    again = parse_train_args(["--config", saved])
    assert again.training.to_dict() == config.training.to_dict()
    assert again.script == config.script
    assert vars(again.model) == vars(config.model)


def test_the_defaults_that_keep_the_host_from_waiting_for_the_gpu_can_be_set_back(tmp_path, monkeypatch):
    from dpolab import config as config_module

    monkeypatch.setattr(config_module, "_accelerator_available", lambda: True)  # as on a GPU machine
    path = write(tmp_path, REQUIRED)
    config = parse_train_args(["--config", path])
    assert config.training.dataloader_pin_memory is True
    assert config.training.logging_nan_inf_filter is False  # TRL's default: True
    assert config.training.accelerator_config.non_blocking is True  # TRL's default: False
    config = parse_train_args(
        ["--config", path, "--logging_nan_inf_filter", "true", "--accelerator_config", '{"non_blocking": false}']
    )
    assert config.training.logging_nan_inf_filter is True
    assert config.training.accelerator_config.non_blocking is False


def test_without_a_gpu_batches_are_neither_pinned_nor_copied_without_blocking(tmp_path, monkeypatch):
    """Pinned memory and non-blocking copies need an accelerator (torch and transformers warn on every run without
    one); given explicitly they are kept."""
    from dpolab import config as config_module

    monkeypatch.setattr(config_module, "_accelerator_available", lambda: False)
    path = write(tmp_path, REQUIRED)
    config = parse_train_args(["--config", path])
    assert config.training.dataloader_pin_memory is False and config.training.accelerator_config.non_blocking is False
    config = parse_train_args(["--config", path, "--dataloader_pin_memory", "true", "--accelerator_config",
                               '{"non_blocking": true}'])  # fmt: skip
    assert config.training.dataloader_pin_memory is True and config.training.accelerator_config.non_blocking is True
