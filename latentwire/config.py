"""Typed LatentWire configuration: dataclasses, JSON load/save, `--set a.b=c` overrides, validation.

A config is a tree of dataclasses. JSON presets live in `configs/`; the command line adds overrides:

    python launch/train.py --config configs/tiny.json --set train.max_steps=8 --set receivers.0.path=/models/x

Every error names the offending key and what was expected; unknown keys suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


DTYPES = ("float32", "bfloat16", "float16")
BOS_POLICIES = ("auto", "always", "never")
PRECISIONS = ("fp16", "int8", "int4", "code")  # "code": FSQ codes (encoder.quantizer), wire format v2
DATA_FORMATS = ("auto", "squad", "hotpot", "nq")
RESERVED_RECEIVER_NAMES = ("wire", "latency", "features", "n_examples", "receivers", "wire_precision", "paths",
                           "data", "split", "device", "intervals")  # the top-level keys of metrics.json
# Evaluation paths a metric name may refer to (see latentwire/eval.py); `latent_<precision>` decodes that precision.
EVAL_PATHS = ("text", "latent", "latent_fp16", "latent_int8", "latent_int4", "token_budget", "byte_budget",
              "embed_raw", "embed_anchor", "embed_resampled")
EVAL_METRIC_KEYS = ("em", "f1", "nll", "first_tok_top1", "first_tok_top5")


@dataclass
class TeacherConfig:
    path: str = ""  # HF model dir or hub id of a larger frozen teacher sharing the receiver's tokenizer
    weight: float = 1.0  # mixing weight of this teacher's probabilities in the KD target
    cache: str = ""  # offline top-k logit cache dir (launch/cache_teacher.py); empty = run the teacher live


@dataclass
class ReceiverConfig:
    name: str = ""  # short unique name, used in metrics and checkpoint keys
    path: str = ""  # HF model dir or hub id, loaded with AutoModelForCausalLM.from_pretrained
    dtype: str = "float32"  # dtype the frozen receiver is loaded in: float32 | bfloat16 | float16
    bos_policy: str = "auto"  # BOS after the latent prefix: auto (if the tokenizer adds one) | always | never
    anchor: str = "Answer:"  # text between prompt/latent and answer; the answer follows as " " + answer
    chat_template: bool = False  # read as a chat model: the text paths are the tokenizer's chat template (user turn)
    chat_instruction: str = ""  # with chat_template: a line after the prompt inside the user turn
    teachers: list[TeacherConfig] = field(default_factory=list)  # optional larger same-tokenizer teachers


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # files or dataset ids; empty = embedded SQuAD sample
    eval_files: list[str] = field(default_factory=list)  # the TEST split; empty = groups cut from the training files
    val_files: list[str] = field(default_factory=list)  # the validation split; empty = groups cut from the training files
    format: str = "auto"  # auto | squad | hotpot | nq
    mix_weights: list[float] = field(default_factory=list)  # per train file sampling weight; empty = by size
    eval_fraction: float = 0.2  # share of groups cut for test when eval_files is empty (article / person / question)
    val_fraction: float = 0.1  # share of the remaining groups cut for validation when val_files is empty
    max_prompt_bytes: int = 768  # UTF-8 bytes of the prompt the encoder reads (longer contexts are cut)
    max_answer_tokens: int = 24  # answer tokens kept as teacher-forcing targets (EOS always appended)
    max_train_examples: int = 0  # 0 = all
    seed: int = 0  # seed of the article split and of the data order


QUANTIZER_KINDS = ("off", "fsq")
MAX_LEVEL = 2**16  # per FSQ dimension: float32 rounding must resolve every step
MAX_MATCH_NGRAM = 7  # encoder.match_ngrams: an n-gram of bytes is hashed exactly into int64 (257**7 < 2**63)
MAX_CODEBOOK = 2**32  # per slot: a code travels as at most 32 bits


@dataclass
class QuantizerConfig:
    """encoder.quantizer: a learned discrete wire (latentwire/quantizer.py; codes travel as wire format v2)."""

    kind: str = "off"  # "off" (float latent on the wire) | "fsq" (finite scalar quantization, codes on the wire)
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ levels per dimension of a shared slot
    private_levels: list[int] = field(default_factory=list)  # FSQ levels of private slots; empty = same as levels


def validate_levels(levels: Sequence[int], key: str) -> None:
    """Raise ValueError naming `key` unless `levels` is a non-empty list of ints in [2, 2**16], product <= 2**32."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ConfigError(f"{key}: expected a non-empty list of integers >= 2, e.g. [8, 5, 5, 5]; got {levels!r}")
    for i, level in enumerate(levels):
        if isinstance(level, bool) or not isinstance(level, int) or not 2 <= level <= MAX_LEVEL:
            raise ConfigError(f"{key}.{i}: each level must be an integer in [2, {MAX_LEVEL}], got {level!r}")
    if math.prod(levels) > MAX_CODEBOOK:
        raise ConfigError(f"{key}: product of levels {list(levels)} is {math.prod(levels)}, over 2**32 "
                         f"(a slot's code must fit in 32 bits)")


def validate_quantizer_config(cfg: QuantizerConfig, key: str = "encoder.quantizer") -> None:
    """Raise ValueError naming the offending field (`<key>.kind`, `<key>.levels.2`, ...); ConfigError is one."""
    if cfg.kind not in QUANTIZER_KINDS:
        raise ConfigError(f"{key}.kind: expected one of {list(QUANTIZER_KINDS)}, got {cfg.kind!r}")
    if cfg.kind == "fsq":
        validate_levels(cfg.levels, f"{key}.levels")
        if cfg.private_levels:
            validate_levels(cfg.private_levels, f"{key}.private_levels")



@dataclass
class EncoderConfig:
    d_model: int = 128  # width of the byte transformer
    n_layers: int = 6  # byte transformer layers
    n_heads: int = 4  # attention heads
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    d_z: int = 64  # width of a latent slot on the wire
    m_shared: int = 8  # slots every receiver reads
    m_private: int = 4  # extra slots per receiver (0 = fully shared)
    dropout: float = 0.0  # dropout inside the byte transformer
    question_queries: bool = False  # pooler queries read the question first, then attend over the prompt
    local_mix: int = 0  # > 1: a depthwise conv over this many preceding bytes before the transformer (0 = off)
    match_ngrams: list[int] = field(default_factory=list)  # n-gram sizes of the question-match feature; empty = off
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)  # off: float slots on the wire


@dataclass
class AdapterConfig:
    hidden: int = 256  # MLP width of the per-receiver adapter
    calibrate: bool = True  # per-example RMS calibration to the receiver's embedding RMS
    rms_scale: float = 1.0  # multiplies the receiver's embedding RMS to give the calibration target


@dataclass
class LossConfig:
    k_tokens: int = 4  # supervised answer tokens (answer followed by EOS) per example
    ce_weight: float = 1.0  # weight of the K-token cross-entropy
    kd_weight: float = 0.5  # weight of KD from the text teacher (and configured teachers)
    kd_temperature: float = 1.0  # KD softmax temperature tau
    reconstruction_weight: float = 0.0  # > 0: the receiver reading P must also reproduce the prompt's tokens (ICAE)
    text_teacher_weight: float = 1.0  # weight of the receiver reading the full text among KD teachers
    span_weight: float = 0.0  # > 0: the encoder's byte states must point at the answer's first and last byte (extractive)


@dataclass
class DataStageConfig:
    """One entry of curriculum.data_stages: training data the run reads BEFORE its own (data.train_files)."""

    train_files: list[str] = field(default_factory=list)  # this stage's training files (required)
    val_files: list[str] = field(default_factory=list)  # validation the stage is judged on; empty = the run's own
    advance_at: float = 0.0  # next stage once periodic validation eval.best_metric reaches this (0 = by steps only)
    max_steps: int = 0  # next stage after this many optimizer steps in the stage at the latest (0 = no cap)


@dataclass
class CurriculumConfig:
    latent_keep_start: float = 1.0  # probability of keeping each shared slot at step 0 (1 = no dropout)
    latent_keep_end: float = 1.0  # keep probability after the ramp
    keep_ramp_steps: int = 0  # steps over which keep probability moves from start to end
    k_start: int = 0  # adaptive K: supervised answer tokens at step 0 (0 = losses.k_tokens, i.e. no ramp)
    k_ramp_steps: int = 0  # steps over which K grows from k_start to losses.k_tokens (0 = at once)
    k_acc_threshold: float = 0.0  # > 0: K grows by one only after a step whose first-token accuracy reaches this
    m_stages: list[int] = field(default_factory=list)  # staged latent length: m_shared per stage, e.g. [64, 48, 32]
    stage_steps: list[int] = field(default_factory=list)  # optimizer step at which each later stage starts
    first_tok_weight_start: float = 0.0  # extra CE weight on answer token 0 at step 0
    first_tok_weight_end: float = 0.0  # extra first-token CE weight after the ramp
    first_tok_ramp_steps: int = 0  # steps over which the first-token weight moves from start to end
    text_warmup_steps: int = 0  # steps at the start whose latent prefix is blended with pooled text embeddings
    data_stages: list[DataStageConfig] = field(default_factory=list)  # easier data first, each judged on validation
    hard_negative_alpha: float = 0.0  # hard-negative KD: 0 = uniform per-example KD weights; > 0 sharpens them


@dataclass
class FeaturesConfig:
    lora: bool = False  # PEFT LoRA on the receivers
    deep_prefix: bool = False  # per-layer key/value prefixes from the latent
    latent_adapters: bool = False  # gated cross-attention to the latent inside the receivers
    coprocessor: bool = False  # KV deltas from the pooled latent
    # Sub-settings are never booleans: `train.active_features` lists the `true` booleans of this section.
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input (active in training only)
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # module names
    lora_layers: int = 0  # adapt only the first N decoder layers (0 = all layers)
    deep_prefix_hidden: int = 256  # bottleneck width of the per-layer key/value generator
    latent_adapter_layers: list[int] = field(default_factory=list)  # decoder layers with a block; empty = evenly spaced
    latent_adapter_count: int = 2  # blocks when latent_adapter_layers is empty
    latent_adapter_dim: int = 256  # attention width inside a block (queries, keys, values)
    latent_adapter_heads: int = 4  # attention heads inside a block
    coprocessor_slots: int = 4  # cache entries per layer the coprocessor writes
    coprocessor_hidden: int = 256  # hidden width of the coprocessor MLP


@dataclass
class TrainConfig:
    max_steps: int = 20  # optimizer steps
    micro_batch: int = 2  # examples per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    decay_steps: int = 0  # cosine horizon in steps, independent of max_steps so extending a run keeps its schedule; 0 = constant lr after warm-up
    warmup_steps: int = 2  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip over all trainables (0 = off)
    save_every: int = 10  # checkpoint interval in optimizer steps (the last step always saves)
    keep_last: int = 3  # step checkpoints kept on disk
    log_every: int = 50  # a plain progress line (or the tqdm postfix) every N steps; metrics.jsonl gets every step
    tensorboard: bool = True  # also write TensorBoard event files under RUN/tensorboard
    seed: int = 0  # model init and step-keyed randomness
    max_consecutive_bad_steps: int = 5  # non-finite steps in a row (each skipped) before the run stops
    diagnostics_every: int = 0  # every N steps log first-token diversity, slot cosine, grad norms at Z (0 = off)
    baseline_verification: bool = False  # milestone-0 gate: forces every feature, KD and the curriculum off
    stop_at_metric: float = 0.0  # stop once the periodic VALIDATION eval.best_metric reaches this (0 = never)

    def global_batch(self, world_size: int) -> int:
        """Examples per optimizer step over all ranks (an OOM back-off changes the split, never this number)."""
        return self.micro_batch * self.grad_accum * world_size


@dataclass
class EvalConfig:
    max_examples: int = 32  # test (or --split validation) examples evaluated (0 = all)
    batch_size: int = 8  # examples per generation batch
    max_new_tokens: int = 12  # greedy decode cap (never the gold length)
    wire_precision: str = "int8"  # precision of the payload the latent path decodes from
    precisions: list[str] = field(default_factory=lambda: ["fp16", "int8", "int4"])  # payload sizes reported
    group_size: int = 64  # wire quantization group (64 keeps int4 scales under 10% of the payload)
    at_end: bool = True  # evaluate after training
    latency_repeats: int = 3  # timed prefill + decode repeats per batch, path and receiver
    embed_replay: bool = True  # also run the embedding-replay baselines (embed_raw / embed_anchor / embed_resampled)
    every: int = 0  # validation evaluation every N optimizer steps during training (0 = off)
    at_start: bool = False  # with `every`: also evaluate before the first step (a step-0 row in metrics.jsonl)
    periodic_examples: int = 16  # examples of each periodic evaluation (0 = eval.max_examples)
    best_metric: str = "latent_f1_mean"  # <path>_<em|f1|nll|first_tok_top1|first_tok_top5>_<mean|receiver name>


@dataclass
class Config:
    receivers: list[ReceiverConfig] = field(default_factory=list)  # frozen LLMs reading the latent
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a JSON value to field type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object with keys {sorted(_field_names(tp))}, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = _field_names(cls)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid: {', '.join(names)})")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, key, f"{prefix}." if prefix else "")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data)
    if cfg.train.baseline_verification:
        apply_baseline_verification(cfg)
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a JSON preset, apply `a.b=c` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a JSON object at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n")


def _parse_value(text: str) -> Any:
    """JSON if it parses (numbers, true/false, lists), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to a raw config dict in place; list indices are numbers."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    value = _parse_value(raw)
    # Walk the dataclass schema alongside the dict so unknown keys fail with a suggestion.
    cls: Any = Config
    node: Any = data
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"override '{dotted}': '{here}' is a list; use a numeric index, not '{part}'")
            index = int(part)
            if index > len(node):
                raise ConfigError(f"override '{dotted}': index {index} is past the end of '{here}' ({len(node)} items)")
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
                return
            node, cls = node[index], typing.get_args(cls)[0]
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown_key(cls, part, f"{here}." if here else "")
        if last:
            node[part] = value
            return
        field_tp = hints[part]
        default = [] if typing.get_origin(field_tp) is list else {}
        node = node.setdefault(part, default)
        cls = field_tp


# ----------------------------------------------------------------------------------------------------------------
# validation


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    if not cfg.receivers:
        raise ConfigError("receivers: at least one receiver {name, path} is required")
    names = [r.name for r in cfg.receivers]
    for i, rec in enumerate(cfg.receivers):
        if not rec.name:
            raise ConfigError(f"receivers.{i}.name: must be a non-empty string")
        if not rec.path:
            raise ConfigError(f"receivers.{i}.path: must name a model directory or hub id")
        _check_choice(f"receivers.{i}.dtype", rec.dtype, DTYPES)
        _check_choice(f"receivers.{i}.bos_policy", rec.bos_policy, BOS_POLICIES)
        if not rec.anchor.strip():
            raise ConfigError(f"receivers.{i}.anchor: must contain visible text (the anchor is never dropped)")
        if rec.chat_instruction and not rec.chat_template:
            raise ConfigError(f"receivers.{i}.chat_instruction: only read with receivers.{i}.chat_template=true")
        for j, teacher in enumerate(rec.teachers):
            if not teacher.path and not teacher.cache:
                raise ConfigError(f"receivers.{i}.teachers.{j}: needs a path or a cache")
            _check_positive(f"receivers.{i}.teachers.{j}.weight", teacher.weight)
    reserved = [n for n in names if n in RESERVED_RECEIVER_NAMES]
    if reserved:
        raise ConfigError(f"receivers: name(s) {reserved} are reserved for metrics.json sections "
                          f"({', '.join(RESERVED_RECEIVER_NAMES)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"receivers: names must be unique, got {names}")
    _check_choice("data.format", cfg.data.format, DATA_FORMATS)
    for key in ("eval_fraction", "val_fraction"):
        if not 0.0 < getattr(cfg.data, key) < 1.0:
            raise ConfigError(f"data.{key}: must be in (0, 1), got {getattr(cfg.data, key)}")
    if cfg.data.mix_weights and len(cfg.data.mix_weights) != len(cfg.data.train_files):
        raise ConfigError("data.mix_weights: needs one weight per entry of data.train_files")
    _check_positive("data.max_prompt_bytes", cfg.data.max_prompt_bytes)
    _check_positive("data.max_answer_tokens", cfg.data.max_answer_tokens)
    enc = cfg.encoder
    for key in ("d_model", "n_layers", "n_heads", "ff_mult", "d_z", "m_shared"):
        _check_positive(f"encoder.{key}", getattr(enc, key))
    _check_positive("encoder.m_private", enc.m_private, allow_zero=True)
    for i, n in enumerate(enc.match_ngrams):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_MATCH_NGRAM:
            raise ConfigError(f"encoder.match_ngrams.{i}: each n-gram size must be an integer in "
                              f"[1, {MAX_MATCH_NGRAM}], got {n!r}")
    if len(set(enc.match_ngrams)) != len(enc.match_ngrams):
        raise ConfigError(f"encoder.match_ngrams: sizes must be distinct, got {enc.match_ngrams}")
    if enc.d_model % enc.n_heads:
        raise ConfigError(f"encoder.d_model ({enc.d_model}) must be divisible by encoder.n_heads ({enc.n_heads})")
    _check_positive("adapter.hidden", cfg.adapter.hidden)
    _check_positive("losses.k_tokens", cfg.losses.k_tokens)
    _check_positive("losses.kd_temperature", cfg.losses.kd_temperature)
    _check_positive("losses.ce_weight", cfg.losses.ce_weight, allow_zero=True)
    _check_positive("losses.kd_weight", cfg.losses.kd_weight, allow_zero=True)
    _check_positive("losses.reconstruction_weight", cfg.losses.reconstruction_weight, allow_zero=True)
    _check_positive("losses.span_weight", cfg.losses.span_weight, allow_zero=True)
    _check_positive("losses.text_teacher_weight", cfg.losses.text_teacher_weight, allow_zero=True)
    for key in ("latent_keep_start", "latent_keep_end"):
        value = getattr(cfg.curriculum, key)
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"curriculum.{key}: must be in (0, 1], got {value}")
    _validate_features(cfg)
    _validate_curriculum(cfg)
    tr = cfg.train
    for key in ("max_steps", "micro_batch", "grad_accum", "save_every", "keep_last", "log_every",
                "max_consecutive_bad_steps"):
        _check_positive(f"train.{key}", getattr(tr, key))
    _check_positive("train.lr", tr.lr)
    _check_positive("train.warmup_steps", tr.warmup_steps, allow_zero=True)
    _check_positive("train.decay_steps", tr.decay_steps, allow_zero=True)
    _check_positive("train.grad_clip", tr.grad_clip, allow_zero=True)
    _validate_eval(cfg, names)


def _validate_eval(cfg: Config, names: list[str]) -> None:
    ev = cfg.eval
    _check_positive("eval.max_examples", ev.max_examples, allow_zero=True)
    _check_positive("eval.batch_size", ev.batch_size)
    _check_positive("eval.max_new_tokens", ev.max_new_tokens)
    _check_positive("eval.group_size", ev.group_size)
    _check_choice("eval.wire_precision", ev.wire_precision, PRECISIONS)
    for i, prec in enumerate(ev.precisions):
        _check_choice(f"eval.precisions.{i}", prec, PRECISIONS)
    validate_quantizer_config(cfg.encoder.quantizer)
    quantized = cfg.encoder.quantizer.kind != "off"
    if quantized != ("code" in ev.precisions) or quantized != (ev.wire_precision == "code"):
        raise ConfigError("eval.wire_precision / eval.precisions: 'code' (the quantizer's codes) must be the wire "
                          "precision and among eval.precisions exactly when encoder.quantizer.kind is on (got "
                          f"kind {cfg.encoder.quantizer.kind!r}, wire_precision {ev.wire_precision!r}, "
                          f"precisions {ev.precisions})")
    if ev.group_size > 65535:
        raise ConfigError(f"eval.group_size: must be <= 65535 (a u16 on the wire), got {ev.group_size}")
    _check_positive("eval.latency_repeats", ev.latency_repeats)
    _check_positive("eval.every", ev.every, allow_zero=True)
    _check_positive("eval.periodic_examples", ev.periodic_examples, allow_zero=True)
    parse_metric_name(ev.best_metric, names)
    if cfg.train.stop_at_metric and not ev.every:
        raise ConfigError("train.stop_at_metric needs the periodic validation evaluation: set eval.every > 0")


def _validate_features(cfg: Config) -> None:
    ft = cfg.features
    if ft.deep_prefix and ft.coprocessor:
        raise ConfigError("features.deep_prefix and features.coprocessor cannot both be on (both write the KV cache)")
    for key in ("lora_rank", "lora_alpha", "deep_prefix_hidden", "latent_adapter_count", "latent_adapter_dim",
                "latent_adapter_heads", "coprocessor_slots", "coprocessor_hidden"):
        _check_positive(f"features.{key}", getattr(ft, key))
    _check_positive("features.lora_layers", ft.lora_layers, allow_zero=True)
    if not 0.0 <= ft.lora_dropout < 1.0:
        raise ConfigError(f"features.lora_dropout: must be in [0, 1), got {ft.lora_dropout}")
    if not ft.lora_targets:
        raise ConfigError("features.lora_targets: name at least one module, e.g. [\"q_proj\", \"v_proj\"]")
    frozen_heads = [t for t in ft.lora_targets if t in ("lm_head", "embed_tokens")]
    if frozen_heads:
        raise ConfigError(f"features.lora_targets: {frozen_heads} cannot be adapted (the losses read the frozen "
                          "LM head and the embedding RMS); use attention or MLP projections")
    if ft.latent_adapter_dim % ft.latent_adapter_heads:
        raise ConfigError(f"features.latent_adapter_dim ({ft.latent_adapter_dim}) must be divisible by "
                          f"features.latent_adapter_heads ({ft.latent_adapter_heads})")
    for i, layer in enumerate(ft.latent_adapter_layers):
        _check_positive(f"features.latent_adapter_layers.{i}", layer, allow_zero=True)


def _validate_curriculum(cfg: Config) -> None:
    cur = cfg.curriculum
    if not 0 <= cur.k_start <= cfg.losses.k_tokens:
        raise ConfigError(f"curriculum.k_start: must be in [0, losses.k_tokens={cfg.losses.k_tokens}], "
                          f"got {cur.k_start}")
    if not 0.0 <= cur.k_acc_threshold <= 1.0:
        raise ConfigError(f"curriculum.k_acc_threshold: must be in [0, 1], got {cur.k_acc_threshold}")
    for key in ("keep_ramp_steps", "k_ramp_steps", "first_tok_weight_start", "first_tok_weight_end",
                "first_tok_ramp_steps", "text_warmup_steps", "hard_negative_alpha"):
        _check_positive(f"curriculum.{key}", getattr(cur, key), allow_zero=True)
    if cur.m_stages:
        for i, m in enumerate(cur.m_stages):
            _check_positive(f"curriculum.m_stages.{i}", m)
        if len(cur.stage_steps) != len(cur.m_stages) - 1:
            raise ConfigError(f"curriculum.stage_steps: needs one start step per stage after the first "
                              f"({len(cur.m_stages) - 1} for m_stages {cur.m_stages}), got {cur.stage_steps}")
        if any(b <= a for a, b in zip([0] + cur.stage_steps, cur.stage_steps)):
            raise ConfigError(f"curriculum.stage_steps: must be positive and increasing, got {cur.stage_steps}")
        if cfg.encoder.m_shared not in cur.m_stages:
            raise ConfigError(f"encoder.m_shared ({cfg.encoder.m_shared}) must be one of curriculum.m_stages "
                              f"{cur.m_stages} (the stage this model is built for)")
    elif cur.stage_steps:
        raise ConfigError("curriculum.stage_steps: set only together with curriculum.m_stages")
    for i, stage in enumerate(cur.data_stages):
        key = f"curriculum.data_stages.{i}"
        if not stage.train_files:
            raise ConfigError(f"{key}.train_files: a data stage needs its own training files")
        _check_positive(f"{key}.max_steps", stage.max_steps, allow_zero=True)
        if not stage.max_steps and not stage.advance_at:
            raise ConfigError(f"{key}: set advance_at (a validation {cfg.eval.best_metric} to reach) or max_steps "
                              "(a step cap), or the stage never ends")
        if stage.advance_at and not cfg.eval.every:
            raise ConfigError(f"{key}.advance_at: decided on the periodic validation, so eval.every must be > 0")


def apply_baseline_verification(cfg: Config) -> None:
    """train.baseline_verification=true (the milestone-0 gate): every feature, KD and the curriculum off, in place.

    The resolved config (config.json) then shows exactly what ran: the encoder, adapters and K-token CE alone."""
    cfg.features = FeaturesConfig()
    cfg.curriculum = CurriculumConfig()
    cfg.losses.kd_weight = 0.0
    cfg.losses.reconstruction_weight = 0.0
    cfg.losses.span_weight = 0.0
    for rec in cfg.receivers:
        rec.teachers = []


def parse_metric_name(metric: str, receiver_names: list[str] | None) -> tuple[str, str, str]:
    """'latent_f1_mean' -> ('latent', 'f1', 'mean'); 'text_nll_qwen' -> ('text', 'nll', 'qwen').

    The last part is 'mean' (over receivers) or one of `receiver_names` (not checked when None); raises
    ConfigError naming eval.best_metric.
    """
    for path in sorted(EVAL_PATHS, key=len, reverse=True):
        if not metric.startswith(path + "_"):
            continue
        rest = metric[len(path) + 1:]
        for key in sorted(EVAL_METRIC_KEYS, key=len, reverse=True):
            if rest.startswith(key + "_"):
                who = rest[len(key) + 1:]
                if who == "mean" or receiver_names is None or who in receiver_names:
                    return path, key, who
                raise ConfigError(f"eval.best_metric: '{metric}' ends in '{who}', which is neither 'mean' nor a "
                                  f"receiver name ({', '.join(receiver_names)})")
        raise ConfigError(f"eval.best_metric: '{metric}' has no metric after '{path}_'; expected one of "
                          f"{', '.join(EVAL_METRIC_KEYS)}")
    raise ConfigError(f"eval.best_metric: '{metric}' must look like <path>_<metric>_<mean|receiver>, with path one "
                      f"of {', '.join(EVAL_PATHS)} (e.g. latent_f1_mean)")


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, as 'a.b: old -> new' lines."""
    lines = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_configs(a, b, f"{path}.")
        elif a != b:
            lines.append(f"{path}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines


def check_resumable(saved: Path, cfg: Config, allow_change: bool) -> None:
    """Refuse to resume a run whose saved config.json differs from `cfg` (naming the changed keys), except for the
    step budget and evaluation settings, or anything at all with `allow_change` (--allow_config_change)."""
    if not saved.exists():
        return
    changed = diff_configs(json.loads(saved.read_text()), to_dict(cfg))
    blocking = [c for c in changed if not c.startswith(("train.max_steps:", "eval."))]
    if blocking and not allow_change:
        raise ConfigError(f"{saved.parent} was started with a different config; changed keys:\n  "
                          + "\n  ".join(blocking)
                          + "\nuse a new --output_dir, or pass --allow_config_change to resume anyway")
