"""DeepSpeed config builder: batch triplet, auto values from H, CPU Adam, clear errors."""

import json

import pytest

from latentwire.distributed import DSConfigError, build_ds_config, read_ds_config, zero_stage
from tests.conftest import ROOT


def _build(name, **kw):
    args = dict(micro_batch=2, grad_accum=3, world_size=4, lr=1e-3, weight_decay=0.01, grad_clip=1.0,
                hidden_size=64, cuda=False)
    args.update(kw)
    return build_ds_config(read_ds_config(str(ROOT / "ds_configs" / name)), **args)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_every_baseline_resolves_without_auto(name):
    ds = _build(name)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3


def test_zero3_buckets_are_integers_from_hidden_size():
    zero = _build("zero3.json", hidden_size=4096)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 40960
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert all(isinstance(zero[k], int) for k in ("stage3_param_persistence_threshold", "reduce_bucket_size"))
    assert zero_stage(_build("zero3.json")) == 3


def test_torch_adam_unless_the_optimizer_is_offloaded():
    """torch's AdamW on CPU ranks and on GPUs (DeepSpeed's FusedAdam would need a JIT-compiled CUDA op); with
    optimizer offload, DeepSpeed's CPU Adam."""
    assert _build("zero2.json")["optimizer"]["params"]["torch_adam"] is True
    assert _build("zero2.json", cuda=True)["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in _build("zero3_offload.json", cuda=True)["optimizer"]["params"]


def test_explicit_batch_conflict_is_named(tmp_path):
    base = read_ds_config(str(ROOT / "ds_configs" / "zero2.json"))
    base["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(DSConfigError, match="train_micro_batch_size_per_gpu=8.*gives 2"):
        build_ds_config(base, 2, 1, 1, 1e-3, 0.0, 1.0, 64, False)


def test_bad_deepspeed_paths(tmp_path):
    with pytest.raises(DSConfigError, match="not found"):
        read_ds_config(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DSConfigError, match="not valid JSON"):
        read_ds_config(str(tmp_path / "bad.json"))


def test_bf16_without_cuda_is_refused():
    base = read_ds_config(str(ROOT / "ds_configs" / "zero2.json"))
    base["bf16"]["enabled"] = True
    with pytest.raises(DSConfigError, match="needs CUDA"):
        build_ds_config(base, 2, 1, 1, 1e-3, 0.0, 1.0, 64, False)


def test_engine_keeps_mixed_precision_off_so_trainables_stay_fp32():
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        ds = _build(name, cuda=True)
        assert ds.get("bf16", {}).get("enabled", False) is False and ds.get("fp16", {}).get("enabled", False) is False


@pytest.mark.parametrize("dtype,bf16,fp16", [("bfloat16", True, False), ("float16", False, True),
                                             ("float32", False, False)])
def test_zero_init_config_enables_exactly_the_frozen_dtype(dtype, bf16, fp16):
    """zero.Init takes its partition dtype from these flags alone (it ignores from_pretrained's dtype)."""
    import torch

    from latentwire.distributed import zero_init_config

    engine = _build("zero3.json")
    loading = zero_init_config(engine, dtype)
    assert loading["bf16"]["enabled"] is bf16 and loading["fp16"]["enabled"] is fp16
    assert zero_init_config(engine, getattr(torch, dtype)) == loading
    assert engine.get("bf16", {}).get("enabled") is False  # the engine's own config is left as it was
    assert {k: v for k, v in loading.items() if k not in ("bf16", "fp16")} == \
        {k: v for k, v in engine.items() if k not in ("bf16", "fp16")}
    with pytest.raises(DSConfigError, match="unknown dtype 'int8'"):
        zero_init_config(engine, "int8")


ZERO_INIT_SNIPPET = """
import json
from latentwire.distributed import (build_ds_config, init_distributed, read_ds_config, setup_environment,
                                    zero_init_config)
setup_environment()
init_distributed()
import deepspeed, torch
engine = build_ds_config(read_ds_config("ds_configs/zero3.json"), micro_batch=1, grad_accum=1, world_size=1,
                         lr=1e-3, weight_decay=0.01, grad_clip=1.0, hidden_size=64, cuda=False)
dtypes = {}
for name, config in (("engine", engine), ("loading", zero_init_config(engine, "bfloat16"))):
    with deepspeed.zero.Init(config_dict_or_path=config):
        layer = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
    dtypes[name] = str(layer.weight.ds_tensor.dtype)
print("RESULT " + json.dumps(dtypes))
"""


def test_zero_init_partitions_in_the_loading_dtype():
    """One CPU rank: a module built under zero.Init with the bf16 loading config holds bf16 partitions; with the
    engine's config (mixed precision off) it would hold fp32 ones: the defect this config fixes. In a child
    process: a process group (and its rendezvous variables) in the test process would leak into every later
    test's training subprocess."""
    from tests.conftest import run_cli

    proc = run_cli(["-c", ZERO_INIT_SNIPPET])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):]) == {"engine": "torch.float32", "loading": "torch.bfloat16"}
