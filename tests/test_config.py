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
