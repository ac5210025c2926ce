"""Device planner: where each frozen receiver and teacher lives, as a pure function of sizes and hardware.

    python launch/plan.py --model meta-llama/Llama-3.1-8B-Instruct --model Qwen/Qwen2.5-7B-Instruct \\
        --model meta-llama/Llama-3.1-70B-Instruct:teacher --gpus 8 --gpu_mem_gib 80 --world_size 8

`plan_placement` decides, for every frozen model, one of three strategies (ARCHITECTURE.md, "Scale-out rules"):

- "replicate": the whole model on every rank's device. Chosen whenever everything fits with headroom, since it
  costs no communication.
- "zero3": partitioned over all ranks, `ceil(bytes / world_size)` resident per rank, whole layers gathered on the
  fly. Receivers sit in the one training engine, so they are partitioned together (the engine then runs ZeRO
  stage 3); each teacher is partitioned on its own, in a separate optimizer-less ZeRO-3 inference engine.
  When replicating everything does not fit, the largest unit (a teacher, or all receivers together) is
  partitioned first, then the next, until it fits.
- "device_map": HF's "auto" split over the GPUs of a single process (world_size 1, several GPUs), used only when
  the models do not fit on one of them. Such models must stay outside the DeepSpeed engine, which would move
  its module onto one device.

Memory per rank = frozen bytes resident on its device + `trainable_bytes` (trainable weights, gradients, Adam
state) + `activation_bytes_per_model` for every frozen model + under ZeRO-3 the gather working set (two layers
of the largest partitioned model: the one running and the one prefetched). The budget is the device memory
(GPU, or the node's RAM shared by its CPU ranks) less `headroom`. When nothing fits, `PlanError` says how much
is needed against how much there is, and how many ranks of that size would do.

The plan is deterministic: integer arithmetic, models in a canonical order (receivers, then teachers, each by
name), so every rank computes the same plan whatever order the models came in.

`model_spec_from_config` sizes a model from its HF config alone: it instantiates it on the meta device and
counts parameters, so nothing is downloaded or loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

if __package__ in (None, ""):  # run as `python launch/plan.py`: make `latentwire` importable for tiny: paths
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 1024**3

ROLES = ("receiver", "teacher")
DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
    "float8": 1, "fp8": 1, "int8": 1,
}
# Trainable side: a byte encoder and adapters of some 50M parameters with fp32 weights, gradients and Adam state.
DEFAULT_TRAINABLE_BYTES = 1 * GiB
# Working memory to run one frozen model: activations kept for the backward pass into the soft prefix (receivers)
# or the no-grad forward (teachers), for a micro-batch of a few hundred tokens.
DEFAULT_ACTIVATION_BYTES_PER_MODEL = 2 * GiB
RECEIVERS_UNIT = "receivers"  # receivers are placed together: they share the training engine


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)  # integers only: identical on every rank and platform


class PlanError(ValueError):
    """The models cannot be placed on the given hardware; the message says what is needed and what there is."""


@dataclass(frozen=True)
class ModelSpec:
    """The size of one frozen model, which is all the planner needs to know about it."""

    name: str  # unique among the planned models
    role: str  # "receiver" | "teacher"
    n_params: int  # parameter count, tied weights counted once
    dtype_bytes: int  # bytes per parameter as loaded (2 for bf16)
    hidden_size: int  # H
    n_layers: int  # decoder layers

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"ModelSpec {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        for field in ("n_params", "dtype_bytes", "hidden_size", "n_layers"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be positive, got {getattr(self, field)}")

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.dtype_bytes

    @property
    def gather_bytes(self) -> int:
        """ZeRO-3 working set while this model runs partitioned: the current layer plus the prefetched one."""
        return 2 * _ceil_div(self.weight_bytes, self.n_layers)


@dataclass(frozen=True)
class Placement:
    """Where one model lives. `bytes_per_rank` is what one process holds over all its devices,
    `bytes_per_device` what sits on its fullest device (they differ only for "device_map")."""

    name: str
    role: str
    strategy: str  # "replicate" | "zero3" | "device_map"
    engine: str  # "training" (receivers), "inference" (a ZeRO-3 teacher engine) or "none" (a plain module)
    n_params: int
    dtype_bytes: int
    bytes_per_rank: int
    bytes_per_device: int


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]  # receivers then teachers, each sorted by name
    zero_stage: int  # ZeRO stage for the training engine (trainables + receivers)
    teacher_inference_engines: bool  # some teacher runs in its own optimizer-less ZeRO-3 engine
    device: str  # "cuda" | "cpu"
    world_size: int
    processes_per_node: int
    gpus: int  # GPUs per node (0 on CPU)
    device_mem_bytes: int  # memory of one rank's device (its share of the node's RAM on CPU)
    budget_bytes: int  # device_mem_bytes less headroom
    peak_bytes: int  # estimated peak on the fullest device
    reasons: tuple[str, ...]

    def placement(self, name: str) -> Placement:
        for placement in self.placements:
            if placement.name == name:
                return placement
        raise KeyError(f"no model named {name!r} in the plan; models: {[p.name for p in self.placements]}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["placements"] = [dataclasses.asdict(p) for p in self.placements]
        out["reasons"] = list(self.reasons)
        return out


def gib(n_bytes: int) -> str:
    """Bytes for people: GiB with one decimal, MiB below 0.1 GiB (tiny models)."""
    return f"{n_bytes / GiB:.1f} GiB" if n_bytes >= GiB // 10 else f"{n_bytes / 2**20:.1f} MiB"


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a name ("bfloat16", "bf16", ...) or a torch.dtype."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
        return DTYPE_BYTES[key]
    itemsize = getattr(dtype, "itemsize", None)
    if not isinstance(itemsize, int):
        raise ValueError(f"unknown dtype {dtype!r}")
    return itemsize


# --------------------------------------------------------------------------------------------------- planning


def _canonical(models: Iterable[ModelSpec]) -> tuple[ModelSpec, ...]:
    ordered = tuple(sorted(models, key=lambda m: (ROLES.index(m.role), m.name)))
    names = [m.name for m in ordered]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model names must be unique; repeated: {duplicates}")
    return ordered


def _units(models: tuple[ModelSpec, ...]) -> list[tuple[str, tuple[ModelSpec, ...]]]:
    """Units that are partitioned as a whole, largest first: all receivers together, each teacher alone."""
    receivers = tuple(m for m in models if m.role == "receiver")
    units = [(RECEIVERS_UNIT, receivers)] if receivers else []
    units += [(m.name, (m,)) for m in models if m.role == "teacher"]
    return sorted(units, key=lambda u: (-sum(m.weight_bytes for m in u[1]), u[0]))


def _zero3_peak(models: Sequence[ModelSpec], partitioned: set[str], world_size: int, fixed: int) -> int:
    resident = sum(_ceil_div(m.weight_bytes, world_size) if m.name in partitioned else m.weight_bytes
                   for m in models)
    gather = max((m.gather_bytes for m in models if m.name in partitioned), default=0)
    return fixed + resident + gather


def _min_ranks(models: Sequence[ModelSpec], budget: int, fixed: int) -> int | None:
    """Fewest ranks of this size on which everything ZeRO-3-partitioned fits; None if no number does."""
    names = {m.name for m in models}
    if _zero3_peak(models, names, 1 << 40, fixed) > budget:
        return None
    world = 1
    while _zero3_peak(models, names, world, fixed) > budget:
        world *= 2
    low, high = world // 2 + 1, world
    while low < high:  # the peak falls monotonically with the world size
        mid = (low + high) // 2
        low, high = (low, mid) if _zero3_peak(models, names, mid, fixed) <= budget else (mid + 1, high)
    return high


def _fixed_bytes(models: Sequence[ModelSpec], trainable_bytes: int, activation_bytes_per_model: int) -> int:
    return trainable_bytes + activation_bytes_per_model * len(models)


def _teacher_hint(models: Sequence[ModelSpec]) -> str:
    if any(m.role == "teacher" for m in models):
        return ", or give teachers an offline logit cache (teachers[].cache) instead of running them live"
    return ""


def _plan_partitioned(models, world_size, budget, fixed, reasons, memory_words):
    """One device per rank: replicate, else partition units largest first. Returns the partitioned names."""
    everything = _zero3_peak(models, set(), world_size, fixed)
    if everything <= budget:
        reasons.append(f"everything replicated needs {gib(everything)} per rank, within the {gib(budget)} budget")
        return set(), everything
    reasons.append(f"everything replicated would need {gib(everything)} per rank > {gib(budget)}: "
                   f"ZeRO-3-partitioning the largest first")
    if world_size > 1:
        partitioned: set[str] = set()
        for unit, members in _units(models):
            partitioned |= {m.name for m in members}
            peak = _zero3_peak(models, partitioned, world_size, fixed)
            reasons.append(f"partition {unit} ({gib(sum(m.weight_bytes for m in members))}) over "
                           f"{world_size} ranks: {gib(peak)} per rank")
            if peak <= budget:
                return partitioned, peak
    need = _zero3_peak(models, {m.name for m in models}, world_size, fixed) if world_size > 1 else everything
    ranks = _min_ranks(models, budget, fixed)
    total = sum(m.weight_bytes for m in models)
    sizes = ", ".join(f"{m.name} {gib(m.weight_bytes)}" for m in models)
    message = (f"the frozen models do not fit: they need {gib(need)} per rank "
               f"({'partitioned over ' + str(world_size) + ' ranks' if world_size > 1 else 'on a single rank'}; "
               f"weights {gib(total)} in all: {sizes}; plus {gib(fixed)} for trainables and activations), "
               f"but a rank has {memory_words}. ")
    if ranks is None:
        message += "The trainables and activations alone exceed a rank's budget: lower train.micro_batch."
    else:
        message += (f"With ZeRO-3 it would fit on {ranks} or more ranks of this size"
                    f"{_teacher_hint(models)}, or keep partitions in CPU RAM (ds_configs/zero3_offload.json).")
    raise PlanError(message)


def _plan_device_map(models, gpus, budget, fixed, reasons, memory_words):
    """One process over several GPUs: whole models on GPU 0 if they fit there, else HF "auto" splits."""
    everything = _zero3_peak(models, set(), 1, fixed)
    if everything <= budget:
        reasons.append(f"everything fits on one GPU ({gib(everything)} of {gib(budget)}), so no device map; "
                       f"the other {gpus - 1} GPU(s) stay idle: launch one process per GPU to use them")
        return set(), everything
    split: set[str] = set()
    peak = everything
    for name, members in _units(models):
        for m in members:
            split.add(m.name)
        # Trainables and activations sit on GPU 0 beside its share of every split model.
        peak = fixed + sum(_ceil_div(m.weight_bytes, gpus) if m.name in split else m.weight_bytes for m in models)
        reasons.append(f"device_map {name} over {gpus} GPUs: GPU 0 holds {gib(peak)}")
        if peak <= budget:
            return split, peak
    raise PlanError(f"the frozen models do not fit: split over all {gpus} GPUs of the process they need {gib(peak)} "
                    f"on GPU 0 (weights {gib(sum(m.weight_bytes for m in models))}, plus {gib(fixed)} for "
                    f"trainables and activations), but a GPU has {memory_words}. Use more GPUs"
                    f"{_teacher_hint(models)}.")


def plan_placement(models: Sequence[ModelSpec], gpus: int, gpu_mem_bytes: int, world_size: int,
                   processes_per_node: int | None = None, headroom: float = 0.2,
                   trainable_bytes: int = DEFAULT_TRAINABLE_BYTES,
                   activation_bytes_per_model: int = DEFAULT_ACTIVATION_BYTES_PER_MODEL,
                   cpu_mem_bytes: int | None = None) -> Plan:
    """Place the frozen `models` (see the module doc).

    gpus: GPUs per node (0 = CPU ranks); gpu_mem_bytes: memory of one GPU; world_size: total processes;
    processes_per_node: default min(world_size, gpus) on GPUs, world_size (one node) on CPU;
    cpu_mem_bytes: RAM of one node, required on CPU, where the node's ranks share it.
    """
    if world_size < 1 or gpus < 0:
        raise ValueError(f"world_size must be >= 1 and gpus >= 0, got world_size={world_size}, gpus={gpus}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a fraction in [0, 1), got {headroom}")
    models = _canonical(models)
    if processes_per_node is None:
        processes_per_node = min(world_size, gpus) if gpus else world_size
    if processes_per_node < 1 or world_size % processes_per_node:
        raise ValueError(f"world_size {world_size} is not a whole number of nodes of {processes_per_node} processes")
    if gpus and processes_per_node > gpus:
        raise PlanError(f"{processes_per_node} processes per node but only {gpus} GPUs: run one process per GPU")
    device_map = gpus > 1 and world_size == 1
    reasons: list[str] = []
    keep = f"{round((1 - headroom) * 100)}%"

    if gpus:
        device, device_mem = "cuda", int(gpu_mem_bytes)
        memory_words = f"{gib(int(device_mem * (1 - headroom)))} ({keep} of a {gib(device_mem)} GPU)"
        layout = (f"1 process over {gpus} GPUs of {gib(device_mem)}" if device_map else
                  f"{world_size} rank(s), one GPU of {gib(device_mem)} each")
        if processes_per_node < gpus and not device_map:
            reasons.append(f"{gpus - processes_per_node} GPU(s) per node unused: launch one process per GPU")
    else:
        if cpu_mem_bytes is None:
            raise ValueError("gpus=0 plans CPU ranks: pass cpu_mem_bytes (the node's RAM)")
        device, device_mem = "cpu", int(cpu_mem_bytes) // processes_per_node
        memory_words = (f"{gib(int(device_mem * (1 - headroom)))} ({keep} of {gib(int(cpu_mem_bytes))} RAM "
                        f"shared by {processes_per_node} rank(s) per node)")
        layout = f"{world_size} CPU rank(s), {processes_per_node} per node sharing {gib(int(cpu_mem_bytes))} RAM"
    budget = int(device_mem * (1 - headroom))
    fixed = _fixed_bytes(models, trainable_bytes, activation_bytes_per_model)
    reasons.insert(0, f"{layout}; budget {gib(budget)} per device after {round(headroom * 100)}% headroom; "
                      f"{gib(fixed)} of it for trainables and activations of {len(models)} frozen model(s)")

    if device_map:
        split, peak = _plan_device_map(models, gpus, budget, fixed, reasons, memory_words)
        strategy_of = {m.name: "device_map" if m.name in split else "replicate" for m in models}
    else:
        split, peak = _plan_partitioned(models, world_size, budget, fixed, reasons, memory_words)
        strategy_of = {m.name: "zero3" if m.name in split else "replicate" for m in models}

    placements = []
    for m in models:
        strategy = strategy_of[m.name]
        if strategy == "zero3":
            per_rank = per_device = _ceil_div(m.weight_bytes, world_size)
        elif strategy == "device_map":
            per_rank, per_device = m.weight_bytes, _ceil_div(m.weight_bytes, gpus)
        else:
            per_rank = per_device = m.weight_bytes
        engine = "training" if m.role == "receiver" else ("inference" if strategy == "zero3" else "none")
        placements.append(Placement(m.name, m.role, strategy, engine, m.n_params, m.dtype_bytes, per_rank, per_device))

    receivers_partitioned = any(p.strategy == "zero3" for p in placements if p.role == "receiver")
    zero_stage = 3 if receivers_partitioned else (2 if world_size > 1 else 0)
    teacher_engines = any(p.engine == "inference" for p in placements)
    if receivers_partitioned:
        reasons.append("receivers are ZeRO-3-partitioned inside the training engine: ZeRO stage 3")
    elif device_map and split:
        reasons.append("one process: training engine at ZeRO stage 0; keep the device-mapped models out of it")
    else:
        reasons.append(f"receivers replicated: training engine at ZeRO stage {zero_stage} "
                       f"({'optimizer state and gradients partitioned' if zero_stage else 'one rank'})")
    if teacher_engines:
        reasons.append("partitioned teachers run in separate optimizer-less ZeRO-3 inference engines")
    return Plan(tuple(placements), zero_stage, teacher_engines, device, world_size, processes_per_node, gpus,
                device_mem, budget, peak, tuple(reasons))


def format_plan(plan: Plan) -> str:
    """A small table of the plan, for `launch/train.py --dry_run`."""
    rows = [("model", "role", "params", "dtype", "strategy", "engine", "per rank", "per device")]
    for p in plan.placements:
        rows.append((p.name, p.role, f"{p.n_params / 1e9:.2f}B" if p.n_params >= 1e8 else f"{p.n_params / 1e6:.2f}M",
                     f"{p.dtype_bytes}B", p.strategy, p.engine, gib(p.bytes_per_rank), gib(p.bytes_per_device)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"training engine: ZeRO stage {plan.zero_stage}; teacher inference engines: "
                 f"{'yes' if plan.teacher_inference_engines else 'no'}; device: {plan.device}, "
                 f"world size {plan.world_size}")
    lines.append(f"peak per device {gib(plan.peak_bytes)} of a {gib(plan.budget_bytes)} budget "
                 f"({gib(plan.device_mem_bytes)} device memory)")
    lines += [f"- {reason}" for reason in plan.reasons]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sizing a model

# Architectures of common receivers/teachers, for hub ids that are neither local nor in the HF cache (no
# network). Only the shape is written down; parameter counts are computed from it on the meta device.
KNOWN_CONFIGS = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                   tie_word_embeddings=False)),
    "llama-3.1-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                    num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                                    tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                 tie_word_embeddings=False)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                  num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                                  tie_word_embeddings=False)),
}


def known_config_key(model_id: str) -> str | None:
    """Map a hub id such as "meta-llama/Meta-Llama-3.1-8B-Instruct" to a KNOWN_CONFIGS key, or None."""
    key = model_id.rstrip("/").rsplit("/", 1)[-1].lower().removeprefix("meta-")
    for suffix in ("-instruct", "-chat-hf", "-hf", "-chat"):
        key = key.removesuffix(suffix)
    return key if key in KNOWN_CONFIGS else None


def load_hf_config(path_or_hf_config):
    """A transformers config from a config object, a dict, a local dir or config.json, the HF cache, or the table."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(path_or_hf_config, PretrainedConfig):
        return path_or_hf_config
    if isinstance(path_or_hf_config, dict):
        values = dict(path_or_hf_config)
        if "model_type" not in values:
            raise ValueError("a config dict needs a 'model_type' key")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = os.fspath(path_or_hf_config)
    if os.path.exists(path):
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path}: cannot read a Hugging Face config: {err}") from err
    try:  # a hub id that is already in the local HF cache
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        pass  # not cached: fall back to the built-in table below
    key = known_config_key(path)
    if key is None:
        raise ValueError(f"{path}: not a local model directory or config.json, not in the Hugging Face cache, and "
                         f"not a built-in architecture ({', '.join(sorted(KNOWN_CONFIGS))})")
    model_type, values = KNOWN_CONFIGS[key]
    return AutoConfig.for_model(model_type, **values)


def count_params_on_meta(hf_config) -> int:
    """Parameters of AutoModelForCausalLM built from `hf_config` on the meta device (no memory, tied once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def model_spec_from_config(path_or_hf_config, name: str, role: str, dtype) -> ModelSpec:
    """Size one model from its config (see `load_hf_config` for what the first argument may be)."""
    hf_config = load_hf_config(path_or_hf_config)
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    try:
        n_params = count_params_on_meta(hf_config)
    except (ValueError, KeyError) as err:
        where = path_or_hf_config if isinstance(path_or_hf_config, (str, os.PathLike)) else type(hf_config).__name__
        raise ValueError(f"{where}: cannot build a causal LM from its config to count parameters: {err}") from err
    return ModelSpec(name=name, role=role, n_params=n_params, dtype_bytes=dtype_bytes(dtype),
                     hidden_size=int(text_config.hidden_size), n_layers=int(text_config.num_hidden_layers))


def _get(entry, key, default=None):
    return entry.get(key, default) if isinstance(entry, dict) else getattr(entry, key, default)


def model_specs_from_receivers(receivers: Sequence, resolve=lambda path: path) -> list[ModelSpec]:
    """ModelSpecs for a config's `receivers` list (dicts or ReceiverConfig objects): each receiver, and each
    live teacher once even when several receivers share it; teachers with an offline `cache` load no model.
    A teacher is sized in its receiver's dtype. `resolve` maps a configured path to a loadable one."""
    specs = [model_spec_from_config(resolve(_get(r, "path")), _get(r, "name"), "receiver", _get(r, "dtype", "float32"))
             for r in receivers]
    teachers: dict[str, str] = {}  # path -> name
    for r in receivers:
        for t in _get(r, "teachers", None) or []:
            path = _get(t, "path")
            if _get(t, "cache") or path in teachers:
                continue
            name = "teacher:" + path.rstrip("/").rsplit("/", 1)[-1]
            while name in teachers.values():
                name += "'"
            teachers[path] = name
            specs.append(model_spec_from_config(resolve(path), name, "teacher", _get(r, "dtype", "float32")))
    return specs


# ------------------------------------------------------------------------------------------------ hardware


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            return int(value)
    return None


def detect_hardware() -> tuple[int, int, int]:
    """(GPUs visible, memory of the smallest in bytes, RAM in bytes, capped by a cgroup limit such as slurm's)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus)) if gpus else 0
    try:
        import psutil

        cpu_mem = psutil.virtual_memory().total
    except ImportError:
        cpu_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_memory_limit()
    return gpus, int(gpu_mem), int(min(cpu_mem, limit) if limit else cpu_mem)


def resolve_model_path(path: str) -> str:
    """LatentWire's names resolve to local directories (hub names such as `tiny:llama3` or `real:qwen2.5-0.5b`
    fetched and cached on first use; `tiny:llama` / `tiny:qwen2` built on first use); other paths are kept."""
    from latentwire.hub import is_hub_name  # standard library only: cheap

    if not (is_hub_name(path) or path.startswith("tiny:")):
        return path
    from latentwire.receivers import resolve_model_path as resolve_latentwire

    return resolve_latentwire(path)


def describe_config_plan(cfg, world_size: int | None = None, processes_per_node: int | None = None) -> str:
    """The plan for a LatentWire Config on this machine (world size from WORLD_SIZE), as text; errors included."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    processes_per_node = processes_per_node or (int(os.environ["LOCAL_WORLD_SIZE"])
                                                if "LOCAL_WORLD_SIZE" in os.environ else None)
    gpus, gpu_mem, cpu_mem = detect_hardware()
    try:
        specs = model_specs_from_receivers(_get(cfg, "receivers"), resolve=resolve_model_path)
        plan = plan_placement(specs, gpus, gpu_mem, world_size, processes_per_node, cpu_mem_bytes=cpu_mem)
    except (PlanError, ValueError) as err:
        return f"device plan: {err}"
    return "device plan:\n" + format_plan(plan)


def _parse_model_arg(item: str) -> tuple[str, str, str]:
    """"PATH[:ROLE][:DTYPE]" -> (path, role, dtype); PATH may itself contain colons (tiny:llama)."""
    parts, role, dtype = item.split(":"), "receiver", "bfloat16"
    while len(parts) > 1 and (parts[-1] in ROLES or parts[-1].lower() in DTYPE_BYTES):
        last = parts.pop()
        role, dtype = (last, dtype) if last in ROLES else (role, last)
    return ":".join(parts), role, dtype


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the device plan for some models on some hardware.")
    parser.add_argument("--model", action="append", required=True, metavar="PATH[:ROLE[:DTYPE]]",
                        help="model dir, config.json or hub id; role receiver (default) or teacher; dtype bfloat16")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default: detected)")
    parser.add_argument("--gpu_mem_gib", type=float, help="memory of one GPU in GiB (default: detected)")
    parser.add_argument("--cpu_mem_gib", type=float, help="RAM of one node in GiB (default: detected)")
    parser.add_argument("--world_size", type=int, default=None, help="total processes (default: GPUs, or 1)")
    parser.add_argument("--processes_per_node", type=int, default=None)
    parser.add_argument("--headroom", type=float, default=0.2)
    args = parser.parse_args(argv)
    gpus, gpu_mem, cpu_mem = detect_hardware()
    gpus = gpus if args.gpus is None else args.gpus
    gpu_mem = gpu_mem if args.gpu_mem_gib is None else int(args.gpu_mem_gib * GiB)
    cpu_mem = cpu_mem if args.cpu_mem_gib is None else int(args.cpu_mem_gib * GiB)
    try:
        specs = []
        for i, item in enumerate(args.model):
            path, role, dtype = _parse_model_arg(item)
            specs.append(model_spec_from_config(resolve_model_path(path), f"{i}:{path.rsplit('/', 1)[-1]}", role,
                                                dtype))
        plan = plan_placement(specs, gpus, gpu_mem, args.world_size or max(gpus, 1), args.processes_per_node,
                              args.headroom, cpu_mem_bytes=cpu_mem)
    except ValueError as err:  # PlanError included
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
