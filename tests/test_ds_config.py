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


def test_torch_adam_on_cpu_only():
    assert _build("zero2.json")["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in _build("zero2.json", cuda=True)["optimizer"]["params"]


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
