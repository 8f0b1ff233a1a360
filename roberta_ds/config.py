"""Typed configs for the model, the data and the training loop, loaded from YAML.

One owner per value: DeepSpeed runtime values (batch sizes, precision, ZeRO stage, clipping,
offload) live only in ds_configs/*.json and are read back from the engine; nothing here sets them.
Unknown keys and wrong types are errors that name the key and the file: pydantic checks each section
against its dataclass's annotations (strict: an integer is not a float, a string or a boolean), the
messages are ours (`build_dataclass`); the checks across fields are each dataclass's __post_init__.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import signal
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BeforeValidator, Strict

from roberta_ds.errors import InputError

KernelBackend = Literal["auto", "torch", "triton"]
Masking = Literal["token", "whole_word", "span"]
AttentionInit = Literal["normal", "local"]
MIN_BPE_VOCAB = 300  # 256 byte tokens + <s> <pad> </s> <unk> <mask>, and some merges


class ConfigError(InputError):
    """A config file or value is wrong; the message names the file and the key."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _float_from_yaml(value: Any) -> Any:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


# A float field: a number (an integer becomes a float), or a string that reads as one.
Float = Annotated[float, BeforeValidator(_float_from_yaml)]


@dataclass(frozen=True)
class Schedule:
    """A value per optimizer step, written [[first_step, value], ...] from step 0 with increasing
    steps (data.seq_len_schedule, data.mlm_probability_schedule). 'step' holds each value until the
    next point; 'linear' interpolates between points; the last value holds after the last point."""

    points: list[list[int | float]]
    interpolate: Literal["step", "linear"] = "step"

    def value_at(self, step: int) -> int | float:
        i = bisect.bisect_right([s for s, _ in self.points], step) - 1
        if self.interpolate == "step" or i == len(self.points) - 1:
            return self.points[i][1]
        (s0, v0), (s1, v1) = self.points[i], self.points[i + 1]
        v = v0 + (v1 - v0) * (step - s0) / (s1 - s0)
        return min(max(v, min(v0, v1)), max(v0, v1))  # never past an end by rounding: K stays a bound

    def check(self, key: str, names: tuple[str, str], ok: Callable[[Any], bool], problem: str) -> None:
        """ConfigErrors naming `key`: names = (step, value) as the messages call them; a value v
        with not ok(v) is reported as f"{value} {v} {problem}"."""
        step_name, value_name = names
        _require(bool(self.points), f"{key}: empty; give [[0, {value_name}], ...] or null")
        for i, entry in enumerate(self.points):
            _require(len(entry) == 2, f"{key}[{i}]: expected [{step_name}, {value_name}], got {entry}")
            step, value = entry
            _require(
                isinstance(step, int) and step >= 0, f"{key}[{i}]: {step_name} {step} must be an integer >= 0"
            )
            _require(ok(value), f"{key}[{i}]: {value_name} {value} {problem}")
        steps = [s for s, _ in self.points]
        _require(steps[0] == 0, f"{key}: must start at step 0, not {steps[0]}")
        _require(all(a < b for a, b in zip(steps, steps[1:])), f"{key}: steps {steps} must increase")


@dataclass
class ModelConfig:
    """The RoBERTa architecture (field meanings follow transformers' RobertaConfig)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    # RoBERTa offsets positions by padding_idx + 1, so 512 tokens need 514 rows.
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: Float = 1e-5
    hidden_dropout: Float = 0.1
    attention_dropout: Float = 0.1
    initializer_range: Float = 0.02
    # Initial values of the attention path: 'normal' (transformers/fairseq: every weight
    # N(0, initializer_range)) or 'local' (position and W_q/W_k start so that each head attends to
    # nearby positions; same architecture and parameters; see model/local_init.py). 'local' lets a
    # small model leave the uniform-attention plateau in hundreds of steps instead of thousands.
    attention_init: AttentionInit = "normal"
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # Which implementation runs the hot ops: 'triton' (fused kernels, needs CUDA), 'torch'
    # (the pure-PyTorch references), or 'auto' (triton on CUDA, torch elsewhere).
    kernels: KernelBackend = "auto"
    # Recompute each encoder layer in the backward instead of storing its activations: only the
    # layer's (B, S, D) input stays alive per layer (model/roberta.py). Like `kernels`, it changes
    # how the forward runs, not what it computes, so a run may switch it between sessions.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{name}={p} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_seq_len(self) -> int:
        """Longest input the position table allows (RoBERTa reserves padding_idx + 1 rows)."""
        return self.max_position_embeddings - self.pad_token_id - 1


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train for real on a 2-core CPU; vocab comes from the tokenizer trained on the corpus.
    "tiny": dict(
        vocab_size=8192,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        intermediate_size=512,
        max_position_embeddings=514,
    ),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),  # 125M
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),  # 355M
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


@dataclass
class DataConfig:
    """Where the packed token shards come from (see roberta_ds/data/prepare.py)."""

    # A dataset folder written by `python -m roberta_ds.prepare`, 'builtin' for the built-in corpus
    # (prepared on first use into `cache_dir`), or a mixture {folder: weight, ...} of prepared
    # folders sharing one tokenizer and seq_len (weights are normalised; see data/mixture.py).
    dataset: str | dict[str, Float] = "builtin"
    cache_dir: str = "data_cache"
    # Only used when dataset == 'builtin': the tokenizer to use or 'train' for a new byte-level BPE.
    tokenizer: str = "train"
    vocab_size: int = 8192
    seq_len: int = 128
    # The masking rate: of every step without mlm_probability_schedule, and of validation always.
    mlm_probability: Float = 0.15
    # What is masked (data/masking.py): 'token' (RoBERTa), 'whole_word' (every token of a space-led
    # word; byte-level BPE) or 'span' (SpanBERT's spans of Geometric(span_length_p) tokens, at most
    # span_max, mean 3.8 for 0.2 and 10).
    masking: Masking = "token"
    span_length_p: Float = 0.2
    span_max: int = 10
    # Masking-rate schedule: [[step, rate], ...] from step 0, linear between points and the last rate
    # after, e.g. [[0, 0.3], [20000, 0.15]] (Mosaic). null = mlm_probability throughout.
    mlm_probability_schedule: list[list[int | Float]] | None = None
    mask_replace_prob: Float = 0.8
    random_replace_prob: Float = 0.1
    # Stop attention at document boundaries inside a packed block (Triton kernel and reference both).
    document_mask: bool = False
    num_workers: int = 1
    # Sequence-length warmup: [[first_step, seq_len], ...] from step 0, e.g. [[0, 128], [9000, 512]];
    # shorter blocks are cut from the same token stream. null = the dataset's seq_len throughout.
    seq_len_schedule: list[list[int]] | None = None

    @property
    def folders(self) -> list[Path]:
        """The prepared folders read (not for 'builtin', whose folder is derived from the settings)."""
        return [Path(f) for f in self.dataset] if isinstance(self.dataset, dict) else [Path(self.dataset)]

    @property
    def peak_mlm_probability(self) -> float:
        """The highest masking rate of the run (what sizes the masked rows per block)."""
        sched = self.mlm_probability_schedule
        return max(rate for _, rate in sched) if sched else self.mlm_probability

    @property
    def weights(self) -> list[float]:
        """Each folder's share of the samples, summing to 1."""
        if not isinstance(self.dataset, dict):
            return [1.0]
        total = sum(self.dataset.values())
        return [w / total for w in self.dataset.values()]

    def __post_init__(self) -> None:
        self._check_mixture()
        self._check_schedule()
        self._check_masking()
        for name in ("mlm_probability", "mask_replace_prob", "random_replace_prob"):
            _require(
                0.0 <= getattr(self, name) <= 1.0, f"data.{name}={getattr(self, name)} must be in [0, 1]"
            )
        _require(
            self.mask_replace_prob + self.random_replace_prob <= 1.0,
            f"data.mask_replace_prob + data.random_replace_prob = "
            f"{self.mask_replace_prob + self.random_replace_prob} must be at most 1",
        )
        _require(self.mlm_probability > 0, "data.mlm_probability=0 masks nothing: nothing to learn")
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _require(self.seq_len >= 8, f"data.seq_len={self.seq_len} is too short for a block (<s> ... </s>)")
        if self.dataset == "builtin" and self.tokenizer == "train":
            _require(
                self.vocab_size >= MIN_BPE_VOCAB,
                f"data.vocab_size={self.vocab_size} is too small for a byte-level BPE "
                f"(256 bytes + 5 specials need at least {MIN_BPE_VOCAB})",
            )

    def _check_mixture(self) -> None:
        if not isinstance(self.dataset, dict):
            return
        _require(
            bool(self.dataset), "data.dataset: an empty mixture; give {folder: weight, ...} or one folder"
        )
        _require("builtin" not in self.dataset, "data.dataset: 'builtin' cannot be mixed; prepare it first")
        for folder, w in self.dataset.items():
            _require(w > 0, f"data.dataset.{folder}: weight {w} must be > 0")
        for folder, share in zip(self.dataset, self.weights):
            _require(
                share >= 1e-4,  # data/mixture.py deals samples in periods of 10,000
                f"data.dataset.{folder}: weight {share:.2g} of the total is below the 1e-4 resolution",
            )

    def _check_masking(self) -> None:
        _require(
            0.0 < self.span_length_p <= 1.0, f"data.span_length_p={self.span_length_p} must be in (0, 1]"
        )
        _require(self.span_max >= 1, f"data.span_max={self.span_max} must be >= 1")
        if self.mlm_probability_schedule is not None:
            Schedule(self.mlm_probability_schedule, "linear").check(
                "data.mlm_probability_schedule",
                ("step", "rate"),
                lambda p: 0.0 < p <= 1.0,
                "must be in (0, 1]",
            )

    def _check_schedule(self) -> None:
        sched = self.seq_len_schedule
        if sched is None:
            return
        Schedule(sched).check(
            "data.seq_len_schedule", ("first_step", "seq_len"), lambda L: L >= 8, "is below 8"
        )
        if self.dataset == "builtin":
            _require(
                max(L for _, L in sched) <= self.seq_len,
                f"data.seq_len_schedule: lengths {[L for _, L in sched]} must be at most data.seq_len="
                f"{self.seq_len}",
            )


@dataclass
class TrainConfig:
    """The optimisation recipe (RoBERTa: Liu et al. 2019, Table 9) and the run's bookkeeping."""

    run_dir: str = "runs/default"
    seed: int = 1234
    max_steps: int = 1000
    lr: Float = 6e-4
    warmup_steps: int = 100
    min_lr_ratio: Float = 0.0
    betas: Annotated[tuple[Float, Float], Strict(False)] = (0.9, 0.98)  # Strict(False): a YAML list
    eps: Float = 1e-6
    weight_decay: Float = 0.01
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 2
    # Continued pretraining: a Hugging Face RobertaForMaskedLM folder to start from.
    init_from_hf: str | None = None
    # Resume from a run folder or checkpoint ('auto' = this run_dir's latest if present).
    resume: str | None = "auto"
    # Stop cleanly (checkpoint, exit code 99 unless overridden) after this many minutes.
    time_limit_minutes: Float | None = None
    preempt_signal: str = "SIGUSR1"
    max_nonfinite_steps: int = 5
    # Peak dense FLOP/s of one device for MFU; None = look the device up in training/metrics.py.
    peak_flops: Float | None = None
    progress_bar: bool = True
    # Stall watchdog: a rank whose step makes no progress for this long (no heartbeat, or stuck in
    # a collective) stops every rank with exit 99 and a message naming it. Well above a step, an
    # evaluation, the first step's compilation and a save of large (minutes each); 0 = off.
    stall_timeout_s: Float = 1800.0

    def __post_init__(self) -> None:
        positive = ("max_steps", "log_every", "eval_batches", "max_nonfinite_steps")
        for name in positive:
            _require(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "warmup_steps", "eval_every", "save_every", "keep_last", "weight_decay"):
            _require(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(all(0.0 <= b < 1.0 for b in self.betas), f"train.betas={list(self.betas)} must be in [0, 1)")
        _require(self.eps > 0, f"train.eps={self.eps} must be > 0")
        _require(
            self.time_limit_minutes is None or self.time_limit_minutes > 0,
            f"train.time_limit_minutes={self.time_limit_minutes} must be > 0 (or null for none)",
        )
        _require(
            self.stall_timeout_s == 0 or self.stall_timeout_s >= 5,
            f"train.stall_timeout_s={self.stall_timeout_s} must be 0 (off) or at least 5 seconds",
        )
        _require(
            self.peak_flops is None or self.peak_flops > 0, f"train.peak_flops={self.peak_flops} must be > 0"
        )
        sig = getattr(signal, self.preempt_signal, None)
        _require(
            isinstance(sig, signal.Signals) and sig not in (signal.SIGKILL, signal.SIGSTOP),
            f"train.preempt_signal={self.preempt_signal!r} is not a signal that can be caught "
            "(e.g. SIGUSR1, SIGUSR2, SIGTERM)",
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Name of the preset the model section started from (recorded for humans).
    preset: str = "tiny"
    # "section.key" values the YAML or the command line stated. Values that the dataset owns
    # (model.vocab_size, data.seq_len of a prepared folder) are derived from it unless stated,
    # and checked against it when stated.
    stated: frozenset[str] = field(default=frozenset(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data)}
        d["train"] = dataclasses.asdict(self.train)
        d["train"]["betas"] = list(d["train"]["betas"])
        d["preset"] = self.preset
        return d


# --------------------------------------------------------------------------------------------
# Loading with errors for people


# Strict: an integer field takes no float, string or boolean, a boolean no 0/1, a string no number
# (pydantic's lax mode would convert them); a Float takes an integer. The dataclasses stay plain
# (code that builds one directly is unchanged); a pydantic model of the same fields checks the YAML.
_STRICT = pydantic.ConfigDict(strict=True, extra="forbid")
# pydantic's error types -> our message (input: the value, kind: its type's name, ctx's fields)
_MESSAGES = {
    "int_type": "expected an integer, got {input!r} ({kind})",
    "float_type": "expected a number, got {input!r} ({kind})",
    "string_type": "expected a string, got {input!r} ({kind})",
    "bool_type": "expected true or false, got {input!r}",
    "literal_error": "{input!r} is not one of {expected}",
    "dict_type": "expected a mapping, got {input!r}",
    "list_type": "expected a list, got {input!r}",
    "tuple_type": "expected a list, got {input!r}",
    "too_long": "expected at most {max_length} values, got {input!r}",
    "missing": "expected at least {count} values, got {input!r}",
}


@functools.cache
def _fields_model(cls: type) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: (hints[f.name], None) for f in dataclasses.fields(cls)}
    return pydantic.create_model(cls.__name__, __config__=_STRICT, **fields)


def _path(loc: tuple, value: Any) -> str:
    """loc as `.key` and `[i]`, read along the value (so pydantic's union member tags drop out)."""
    out = ""
    for step in loc:
        if isinstance(value, dict) and step in value:
            out, value = f"{out}.{step}", value[step]
        elif isinstance(value, list | tuple) and isinstance(step, int) and step < len(value):
            out, value = f"{out}[{step}]", value[step]
    return out


def _message(errors: list[dict], cls: type, values: dict[str, Any], where: str) -> str:
    """One line for the first wrong key of the file: an unknown key, else the first key in the
    file's order, and of its errors the deepest (of a union's members, the one that got past the
    kind of value says most: a mixture's bad weight, not "not a string")."""
    unknown = sorted(e["loc"][0] for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return f"{where}: unknown key {unknown[0]!r} (known keys: {known})"
    order = list(values)
    e = min(errors, key=lambda e: (order.index(e["loc"][0]), -len(e["loc"])))
    got = e["input"]
    fields = {**e.get("ctx", {}), "input": got, "kind": type(got).__name__, "msg": e["msg"]}
    if e["type"] == "missing":  # a tuple's item: loc ends at its index
        fields["count"] = e["loc"][-1] + 1
    text = _MESSAGES.get(e["type"], "{msg}, got {input!r}").format(**fields)
    return f"{where}{_path(e['loc'], values)}: {text}"


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values) with unknown keys and wrong types reported as `where.key`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {values!r}")
    try:
        checked = _fields_model(cls).model_validate(values)
    except pydantic.ValidationError as e:
        raise ConfigError(_message(e.errors(), cls, values, where)) from None
    try:
        return cls(**{k: getattr(checked, k) for k in values})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark:  # e.g. "while parsing a flow sequence" that opened on an earlier line
            problem += f" ({ctx} at line {ctx_mark.line + 1})"
        raise ConfigError(f"{path}:{loc}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with model/data/train sections")
    return data


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run YAML: `model: {preset: tiny, ...overrides}`, `data: {...}`, `train: {...}`.
    A run folder's run_config.yaml (top-level `preset`, every field spelled out) is accepted too."""
    raw = load_yaml(path) if path is not None else {}
    src = str(path) if path is not None else "<defaults>"
    unknown = sorted(set(raw) - {"model", "data", "train", "preset"})
    if unknown:
        raise ConfigError(f"{src}: unknown section {unknown[0]!r} (sections: model, data, train)")
    for section in ("model", "data", "train"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"{src}: {section}: expected a mapping of keys, got {raw[section]!r}")
        raw[section] = {**(raw.get(section) or {}), **(overrides or {}).get(section, {})}
    stated = frozenset(f"{sec}.{k}" for sec in ("model", "data", "train") for k in raw[sec])
    model_raw = dict(raw["model"])
    preset = model_raw.pop("preset", raw.get("preset", "tiny"))
    if preset not in MODEL_PRESETS:
        raise ConfigError(
            f"{src}: model.preset: unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}"
        )
    model = build_dataclass(ModelConfig, {**MODEL_PRESETS[preset], **model_raw}, f"{src}: model")
    data = build_dataclass(DataConfig, raw["data"], f"{src}: data")
    train = build_dataclass(TrainConfig, raw["train"], f"{src}: train")
    # A prepared dataset owns its length (checked against the model once it is read), so the
    # built-in corpus's default data.seq_len is checked only where it is the length used or stated.
    checks_seq_len = data.dataset == "builtin" or "data.seq_len" in stated
    if checks_seq_len and data.seq_len > model.max_seq_len:
        raise ConfigError(
            f"{src}: data.seq_len={data.seq_len} is above the model's {model.max_seq_len} positions "
            f"(model.max_position_embeddings={model.max_position_embeddings} minus padding_idx + 1)"
        )
    return RunConfig(model=model, data=data, train=train, preset=preset, stated=stated)
