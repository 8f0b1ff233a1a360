import pytest

from roberta_ds.config import ConfigError, load_run_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_valid_config_applies_preset_and_overrides(tmp_path):
    cfg = load_run_config(
        write(tmp_path, "model:\n  preset: base\n  hidden_dropout: 0.0\ntrain:\n  lr: 1e-4\n")
    )
    assert cfg.model.hidden_size == 768 and cfg.model.hidden_dropout == 0.0 and cfg.train.lr == 1e-4
    assert cfg.train.betas == (0.9, 0.98) and cfg.train.eps == 1e-6 and cfg.train.weight_decay == 0.01


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "train:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train: unknown key 'learning_rate'"):
        load_run_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'optim'"):
        load_run_config(write(tmp_path, "optim: {}\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 'ten'"):
        load_run_config(write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(ConfigError, match=r"model\.kernels: 'cuda' is not one of"):
        load_run_config(write(tmp_path, "model:\n  kernels: cuda\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_run_config("/no/such.yaml")


def test_malformed_yaml_gives_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 4, column 1: malformed YAML: .*flow sequence at line 3"):
        load_run_config(write(tmp_path, "train:\n  lr: 1\n  bad: [1, 2\n"))


def test_seq_len_above_positions(tmp_path):
    with pytest.raises(ConfigError, match="data.seq_len=600 is above the model's 512 positions"):
        load_run_config(write(tmp_path, "data:\n  seq_len: 600\n"))


def test_a_prepared_dataset_owns_seq_len_so_the_builtin_default_is_not_checked(tmp_path):
    """A model of 64 positions on a prepared dataset: the built-in corpus's default data.seq_len
    (128) is not the length used, so it is not checked (the dataset's length is, once read); the
    same model on the built-in corpus, or with data.seq_len stated, is still refused."""
    small = "model:\n  max_position_embeddings: 66\n"  # 64 positions (padding_idx 1)
    cfg = load_run_config(write(tmp_path, small + "data:\n  dataset: data/mine\n"))
    assert cfg.model.max_seq_len == 64 and cfg.data.seq_len == 128  # the unused default
    with pytest.raises(ConfigError, match="data.seq_len=128 is above the model's 64 positions"):
        load_run_config(write(tmp_path, small))
    with pytest.raises(ConfigError, match="data.seq_len=128 is above the model's 64 positions"):
        load_run_config(write(tmp_path, small + "data:\n  dataset: data/mine\n  seq_len: 128\n"))


def test_stall_timeout_is_off_or_at_least_5_s(tmp_path):
    assert load_run_config(write(tmp_path, "train:\n  stall_timeout_s: 0\n")).train.stall_timeout_s == 0
    with pytest.raises(ConfigError, match="train.stall_timeout_s=2.0 must be 0 .off. or at least 5"):
        load_run_config(write(tmp_path, "train:\n  stall_timeout_s: 2\n"))


def test_bad_value_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        load_run_config(write(tmp_path, "model:\n  num_heads: 5\n"))


def test_types_are_strict_where_yaml_is_ambiguous(tmp_path):
    """An integer field takes no boolean or float, a boolean no 0/1; a float field takes an
    integer (as a float) and PyYAML's string for `1e-4`."""
    for text, match in (
        ("train:\n  max_steps: true\n", r"train\.max_steps: expected an integer, got True \(bool\)"),
        ("train:\n  max_steps: 2.0\n", r"train\.max_steps: expected an integer, got 2\.0 \(float\)"),
        ("train:\n  progress_bar: 1\n", r"train\.progress_bar: expected true or false, got 1"),
        ("train:\n  lr: true\n", r"train\.lr: expected a number, got True \(bool\)"),
        ("train:\n  betas: [0.9]\n", r"train\.betas: expected at least 2 values, got \[0\.9\]"),
        ("data:\n  tokenizer: 5\n", r"data\.tokenizer: expected a string, got 5 \(int\)"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_run_config(write(tmp_path, text))
    cfg = load_run_config(write(tmp_path, "train:\n  lr: 1e-4\n  warmup_steps: 5\n  stall_timeout_s: 60\n"))
    assert cfg.train.lr == 1e-4 and type(cfg.train.stall_timeout_s) is float and cfg.train.warmup_steps == 5


def test_messages_name_the_file_the_key_and_the_known_keys(tmp_path):
    p = write(tmp_path, "data:\n  dataset: {data/a: 1, data/b: heavy}\n")
    with pytest.raises(
        ConfigError, match=r"run\.yaml: data\.dataset\.data/b: expected a number, got 'heavy'"
    ):
        load_run_config(p)
    with pytest.raises(ConfigError, match=r"run\.yaml: data\.dataset: expected a string, got 5 \(int\)"):
        load_run_config(write(tmp_path, "data:\n  dataset: 5\n"))
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[1\]: expected a list, got 5$"):
        load_run_config(write(tmp_path, "data:\n  seq_len_schedule: [[0, 64], 5]\n"))
    with pytest.raises(
        ConfigError, match=r"model: unknown key 'heads' \(known keys: activation_checkpointing, "
    ):
        load_run_config(write(tmp_path, "model:\n  heads: 4\n"))


def test_dataclasses_built_directly_keep_their_errors_and_the_resolved_config_reloads(tmp_path):
    """Code that builds a config itself gets a ConfigError from its checks, as before; the written
    run_config.yaml (to_dict) loads back to the same config."""
    import yaml

    from roberta_ds.config import ModelConfig

    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(num_heads=5)
    text = "data:\n  mlm_probability_schedule: [[0, 0.3], [9, 1]]\n  dataset: {a: 1, b: 3}\n"
    cfg = load_run_config(write(tmp_path, text))
    saved = tmp_path / "run_config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_run_config(saved)
    assert again.to_dict() == cfg.to_dict() and again.data.mlm_probability_schedule == [[0, 0.3], [9, 1]]
    assert type(again.data.mlm_probability_schedule[1][1]) is int  # written back as it was given


def test_one_schedule_type_holds_steps_and_interpolates_rates():
    from roberta_ds.config import Schedule

    seq = Schedule([[0, 128], [9000, 512]])
    assert [seq.value_at(s) for s in (0, 8999, 9000, 10**6)] == [128, 128, 512, 512]
    rate = Schedule([[0, 0.1], [10, 0.5], [20, 0.2]], "linear")
    assert [rate.value_at(s) for s in (5, 10, 15, 25)] == pytest.approx([0.3, 0.5, 0.35, 0.2])
    for points, match in (
        ([[0, 64], [-5, 128]], r"k\[1\]: first_step -5 must be an integer >= 0"),
        ([[0, 4]], r"k\[0\]: seq_len 4 is below 8"),
        ([[3, 64]], "k: must start at step 0, not 3"),
    ):
        with pytest.raises(ConfigError, match=match):
            Schedule(points).check("k", ("first_step", "seq_len"), lambda v: v >= 8, "is below 8")
