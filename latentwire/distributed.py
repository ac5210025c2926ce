"""Distributed plumbing as small pure functions: the DeepSpeed config builder, process-group setup, rank helpers,
and the ZeRO-3 helpers (`is_partitioned`, `gathered`, `frozen_bytes`) and rank agreement (`any_rank`).

`build_ds_config` fills every "auto" (or missing) value of a DeepSpeed JSON baseline from the LatentWire config,
the world size and the receivers' hidden size H, and asserts global = micro * accumulation * world.

Precision: the engine's config keeps DeepSpeed's bf16/fp16 modes off unless the JSON turns them on, so the small
trainables keep fp32 weights and Adam state (DeepSpeed's bf16 mode would cast the whole wrapped module, trainables
included, and run them in bf16). The frozen receivers and teachers carry their own dtype (`receivers[].dtype`):
`partitioned_loading(ds_config, dtype)` hands `zero.Init` a loading config with that precision enabled
(`zero_init_config`), because zero.Init casts every parameter it partitions to fp32 when the config enables neither
bf16 nor fp16, whatever dtype `from_pretrained` was given.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch

DEFAULT_DS_CONFIG = {
    "zero_optimization": {"stage": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": "auto", "torch_adam": "auto"}},
    "steps_per_print": 1000000,
}


class DSConfigError(ValueError):
    """The DeepSpeed config file or the batch layout is invalid."""


def read_ds_config(path: str | None) -> dict:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    p = Path(path)
    if not p.is_file():
        raise DSConfigError(f"--deepspeed config not found: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise DSConfigError(f"--deepspeed config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DSConfigError(f"--deepspeed config {path}: expected a JSON object")
    return data


def _fill(section: dict, key: str, value) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def build_ds_config(base: dict, micro_batch: int, grad_accum: int, world_size: int, lr: float,
                    weight_decay: float, grad_clip: float, hidden_size: int, cuda: bool) -> dict:
    """A complete DeepSpeed config. Explicit batch values in `base` must agree with the LatentWire config."""
    ds = copy.deepcopy(base)
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world_size}
    for key, value in want.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise DSConfigError(f"DeepSpeed config sets {key}={ds[key]} but the LatentWire config gives {value} "
                                f"(train.micro_batch={micro_batch}, train.grad_accum={grad_accum}, world={world_size});"
                                " set it to \"auto\"")
        ds[key] = value
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise DSConfigError("global batch != micro * accumulation * world")
    _fill(ds, "gradient_clipping", float(grad_clip))
    opt = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_DS_CONFIG["optimizer"]))
    params = opt.setdefault("params", {})
    _fill(params, "lr", float(lr))
    _fill(params, "weight_decay", float(weight_decay))
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if not cuda and not offload:
        params["torch_adam"] = True  # the fused Adam op needs a GPU
    elif params.get("torch_adam", "auto") == "auto":
        # On GPU, torch's own AdamW (foreach / fused CUDA kernels): DeepSpeed's FusedAdam is a C++/CUDA op that a
        # pure-Python DeepSpeed install must JIT-compile first (nvcc + ninja, minutes), for trainables of a few
        # tens of millions of parameters whose update costs nothing next to the frozen forwards. With optimizer
        # offload DeepSpeed's CPU Adam runs instead.
        if offload:
            params.pop("torch_adam", None)
        else:
            params["torch_adam"] = True
    for precision in ("bf16", "fp16"):
        if precision in ds:
            # "auto" keeps DeepSpeed's mixed precision off, on GPU too: it would cast the trainables (small, kept
            # fp32) to bf16. The frozen models keep their own dtype through `zero_init_config` when they load.
            _fill(ds[precision], "enabled", False)
            if ds[precision]["enabled"] and not cuda:
                raise DSConfigError(f"{precision} training needs CUDA; this run has none")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    h = int(hidden_size)
    # HF's integration fills these from H so tiny and 8B receivers are both really partitioned.
    _fill(zero, "reduce_bucket_size", h * h)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h))
    _fill(zero, "stage3_param_persistence_threshold", 10 * h)
    for key, value in zero.items():
        if value == "auto":
            raise DSConfigError(f"zero_optimization.{key} is \"auto\" and has no rule to fill it")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "allgather_bucket_size"):
        if key in zero:
            zero[key] = int(zero[key])
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def setup_environment() -> None:
    """Environment defaults before deepspeed is imported: CPU accelerator and a single-process rendezvous."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialize the process group (gloo on CPU, nccl on GPU) once; returns (rank, world_size)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if not torch.cuda.is_available():
            _skip_shm_comm_op()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at start-up (about a minute of C++ on
    2 cores). Only tensor-parallel inference uses it; training over gloo never does, so mark it unavailable."""
    import deepspeed.ops

    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean of a list of floats over all ranks (fp64 on CPU, gloo-friendly)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t.cpu() / dist.get_world_size()
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is set on any rank (all-reduce MAX; a collective: all ranks call it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_over_ranks(value: int) -> int:
    """The largest `value` over all ranks (all-reduce MAX; a collective: all ranks call it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 partitioned parameter (its full data lives only inside a gather)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor]):
    """Materialize ZeRO-3 partitioned parameters for reading; a no-op for ordinary tensors."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


def frozen_bytes(module) -> tuple[int, int]:
    """(total bytes of `module`'s frozen parameters, bytes actually resident on this rank: the partition under
    ZeRO-3)."""
    total = resident = 0
    for p in module.parameters():
        if p.requires_grad:
            continue
        size = p.element_size()
        if is_partitioned(p):
            total += p.ds_numel * size
            resident += p.ds_tensor.numel() * size
        else:
            total += p.numel() * size
            resident += p.numel() * size
    return total, resident


def gather_object(value) -> list:
    """`value` of every rank, in rank order (a collective)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# DeepSpeed config section enabling each half precision; zero.Init reads the dtype it partitions in from these.
_PRECISION_SECTIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # receivers[].dtype


def zero_init_config(ds_config: dict, dtype: torch.dtype | str | None) -> dict:
    """The config `zero.Init` reads while frozen weights of `dtype` load: `ds_config` with exactly that precision
    enabled (bf16 or fp16) or neither (fp32). `deepspeed.zero.Init` takes its partition dtype from the config's
    bf16/fp16 flags alone when HF calls it, so without this a bf16 receiver is stored in fp32 (twice the memory the
    planner counts). Only the loading sees it: the engine keeps `ds_config`, and with it fp32 trainables."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise DSConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[dtype]
    out = copy.deepcopy(ds_config)
    for half, section in _PRECISION_SECTIONS.items():
        out[section] = {**out.get(section, {}), "enabled": dtype == half}
    return out


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None, dtype: torch.dtype | str | None = None):
    """While alive, `from_pretrained` partitions weights as they load (HF's ZeRO-3 integration): pass a ZeRO-3
    DeepSpeed config, or None for plain loading, and the dtype the weights load in (`receivers[].dtype`; None keeps
    whatever precision `ds_config` enables). HF holds only a weak reference to its DeepSpeed config, so this keeps
    it alive for the block and unsets it afterwards, so nothing else is affected."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_ds

    keep = HfDeepSpeedConfig(ds_config if dtype is None else zero_init_config(ds_config, dtype))
    try:
        yield keep
    finally:
        hf_ds.unset_hf_deepspeed_config()
