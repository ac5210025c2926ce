"""launch/plan.py: placement decisions over realistic scenarios, errors, determinism, meta-device sizing.

    pytest tests/test_plan.py
"""

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from launch.plan import (
    GiB,
    KNOWN_CONFIGS,
    ModelSpec,
    PlanError,
    format_plan,
    known_config_key,
    model_spec_from_config,
    model_specs_from_receivers,
    plan_placement,
)

GB80 = 80 * GiB


def spec(name, billions, role="receiver", dtype_bytes=2, hidden=4096, layers=32):
    return ModelSpec(name, role, int(billions * 1e9), dtype_bytes, hidden, layers)


LLAMA8B = spec("llama8b", 8.03)
QWEN7B = spec("qwen7b", 7.62, hidden=3584, layers=28)
LLAMA70B = spec("llama70b", 70.55, role="teacher", hidden=8192, layers=80)


def strategies(plan):
    return {p.name: p.strategy for p in plan.placements}


def test_one_80gb_gpu_replicates_two_receivers():
    # bf16: 16.1 GB + 15.2 GB of weights, plus trainables and activations, is well inside 80% of 80 GiB.
    plan = plan_placement([LLAMA8B, QWEN7B], gpus=1, gpu_mem_bytes=GB80, world_size=1)
    assert strategies(plan) == {"llama8b": "replicate", "qwen7b": "replicate"}
    assert plan.zero_stage == 0 and not plan.teacher_inference_engines
    assert plan.placement("llama8b").bytes_per_rank == LLAMA8B.weight_bytes
    assert plan.peak_bytes <= plan.budget_bytes == int(GB80 * 0.8)
    assert any("within" in r for r in plan.reasons)


def test_8x80gb_partitions_the_70b_teacher_and_replicates_receivers():
    plan = plan_placement([LLAMA8B, QWEN7B, LLAMA70B], gpus=8, gpu_mem_bytes=GB80, world_size=8)
    assert strategies(plan) == {"llama8b": "replicate", "qwen7b": "replicate", "llama70b": "zero3"}
    teacher = plan.placement("llama70b")
    assert teacher.engine == "inference" and plan.teacher_inference_engines
    assert teacher.bytes_per_rank == -(-LLAMA70B.weight_bytes // 8)
    assert plan.zero_stage == 2  # receivers replicated: the training engine need not partition parameters
    assert plan.peak_bytes <= plan.budget_bytes


def test_receivers_too_big_to_replicate_are_partitioned_together_at_stage_3():
    small_teacher = spec("teacher1b", 1.2, role="teacher", hidden=2048, layers=16)
    plan = plan_placement([LLAMA8B, QWEN7B, small_teacher], gpus=4, gpu_mem_bytes=24 * GiB, world_size=4)
    assert strategies(plan) == {"llama8b": "zero3", "qwen7b": "zero3", "teacher1b": "replicate"}
    assert plan.zero_stage == 3 and not plan.teacher_inference_engines
    assert plan.placement("teacher1b").engine == "none"


def test_four_gpus_in_one_process_use_a_device_map():
    plan = plan_placement([LLAMA8B, LLAMA70B], gpus=4, gpu_mem_bytes=GB80, world_size=1)
    assert strategies(plan) == {"llama8b": "replicate", "llama70b": "device_map"}
    teacher = plan.placement("llama70b")
    assert teacher.bytes_per_rank == LLAMA70B.weight_bytes  # the one process holds all of it ...
    assert teacher.bytes_per_device == -(-LLAMA70B.weight_bytes // 4)  # ... a quarter per GPU
    assert plan.zero_stage == 0 and not plan.teacher_inference_engines
    assert any("out of" in r for r in plan.reasons)  # device-mapped models stay outside the engine


def test_one_process_on_four_gpus_without_device_map_when_it_fits_on_one():
    plan = plan_placement([LLAMA8B], gpus=4, gpu_mem_bytes=GB80, world_size=1)
    assert strategies(plan) == {"llama8b": "replicate"}
    assert any("one process per GPU" in r for r in plan.reasons)


def test_cpu_ranks_replicate_tiny_models():
    tiny = [spec("tiny-llama", 0.0003, dtype_bytes=4, hidden=64, layers=2), spec("tiny-qwen", 0.0004, dtype_bytes=4)]
    plan = plan_placement(tiny, gpus=0, gpu_mem_bytes=0, world_size=2, cpu_mem_bytes=16 * GiB)
    assert plan.device == "cpu" and plan.processes_per_node == 2
    assert set(strategies(plan).values()) == {"replicate"}
    assert plan.device_mem_bytes == 8 * GiB  # two ranks share the node's RAM


def test_cpu_ranks_partition_when_ram_is_short():
    plan = plan_placement([LLAMA8B, QWEN7B], gpus=0, gpu_mem_bytes=0, world_size=2, cpu_mem_bytes=64 * GiB)
    assert set(strategies(plan).values()) == {"zero3"} and plan.zero_stage == 3


def test_cpu_needs_the_ram_size():
    with pytest.raises(ValueError, match="cpu_mem_bytes"):
        plan_placement([LLAMA8B], gpus=0, gpu_mem_bytes=0, world_size=1)


def test_70b_teacher_on_one_24gb_gpu_says_what_is_needed_and_what_there_is():
    with pytest.raises(PlanError) as err:
        plan_placement([LLAMA8B, LLAMA70B], gpus=1, gpu_mem_bytes=24 * GiB, world_size=1)
    message = str(err.value)
    need = (LLAMA8B.weight_bytes + LLAMA70B.weight_bytes) / GiB
    assert f"{need:.1f} GiB" in message  # weights needed
    assert "19.2 GiB" in message and "24.0 GiB GPU" in message  # what a rank has: 80% of 24 GiB
    assert "llama70b 131.4 GiB" in message
    assert "or more ranks" in message and "cache" in message  # how to make it fit


def test_too_few_ranks_even_partitioned_reports_the_rank_count_that_would_do():
    with pytest.raises(PlanError, match=r"fit on \d+ or more ranks") as err:
        plan_placement([LLAMA8B, LLAMA70B], gpus=2, gpu_mem_bytes=24 * GiB, world_size=2)
    ranks = int(re.search(r"fit on (\d+) or more ranks", str(err.value)).group(1))
    plan_placement([LLAMA8B, LLAMA70B], gpus=8, gpu_mem_bytes=24 * GiB, world_size=ranks,
                   processes_per_node=8 if ranks % 8 == 0 else 1)
    with pytest.raises(PlanError):
        plan_placement([LLAMA8B, LLAMA70B], gpus=1, gpu_mem_bytes=24 * GiB, world_size=ranks - 1)


def test_device_map_that_does_not_fit_is_an_error():
    with pytest.raises(PlanError, match="GPU 0"):
        plan_placement([LLAMA70B], gpus=2, gpu_mem_bytes=24 * GiB, world_size=1)


def test_more_processes_than_gpus_is_an_error():
    with pytest.raises(PlanError, match="one process per GPU"):
        plan_placement([LLAMA8B], gpus=2, gpu_mem_bytes=GB80, world_size=4, processes_per_node=4)


def test_duplicate_names_and_bad_roles_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        plan_placement([LLAMA8B, LLAMA8B], gpus=1, gpu_mem_bytes=GB80, world_size=1)
    with pytest.raises(ValueError, match="role"):
        ModelSpec("x", "student", 10, 2, 8, 1)


def test_plan_is_deterministic_and_independent_of_input_order():
    models = [LLAMA8B, QWEN7B, LLAMA70B, spec("other70b", 70.55, role="teacher", hidden=8192, layers=80)]
    first = plan_placement(models, gpus=8, gpu_mem_bytes=GB80, world_size=16)
    for seed in range(5):
        shuffled = models[:]
        random.Random(seed).shuffle(shuffled)
        again = plan_placement(shuffled, gpus=8, gpu_mem_bytes=GB80, world_size=16)
        assert again == first
        assert json.dumps(again.to_dict()) == json.dumps(first.to_dict())
    assert [p.name for p in first.placements] == ["llama8b", "qwen7b", "llama70b", "other70b"]


def test_to_dict_and_format_plan():
    plan = plan_placement([LLAMA8B, QWEN7B, LLAMA70B], gpus=8, gpu_mem_bytes=GB80, world_size=8)
    as_dict = json.loads(json.dumps(plan.to_dict()))
    assert as_dict["zero_stage"] == 2 and as_dict["placements"][2]["strategy"] == "zero3"
    table = format_plan(plan)
    assert "llama70b" in table and "zero3" in table and "ZeRO stage 2" in table
    assert table.count("\n") >= len(plan.placements) + 3


# ------------------------------------------------------------------------------------------ sizing on meta


def tiny_llama_config(tied):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_meta_count_equals_the_real_model(tmp_path, tied):
    config = tiny_llama_config(tied)
    torch.manual_seed(0)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    config.save_pretrained(tmp_path)
    from_object = model_spec_from_config(config, "tiny", "receiver", "float32")
    from_dir = model_spec_from_config(str(tmp_path), "tiny", "receiver", "bfloat16")
    from_file = model_spec_from_config(tmp_path / "config.json", "tiny", "teacher", torch.float16)
    assert from_object.n_params == from_dir.n_params == from_file.n_params == real
    assert (from_object.dtype_bytes, from_dir.dtype_bytes, from_file.dtype_bytes) == (4, 2, 2)
    assert (from_dir.hidden_size, from_dir.n_layers) == (64, 2)


# Published parameter counts of these checkpoints; the planner derives them from the architecture alone.
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Meta-Llama-3.1-70B-Instruct": 70_553_706_496,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_builtin_architectures_count_to_the_published_sizes(hub_id, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: force the built-in table
    model = model_spec_from_config(hub_id, "m", "teacher", "bfloat16")
    assert model.n_params == PUBLISHED[hub_id]
    assert model.weight_bytes == 2 * PUBLISHED[hub_id]
    assert known_config_key(hub_id) in KNOWN_CONFIGS


def test_unknown_or_broken_paths_are_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="some-org/unknown-model"):
        model_spec_from_config("some-org/unknown-model", "m", "receiver", "bfloat16")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(broken)):
        model_spec_from_config(str(broken), "m", "receiver", "bfloat16")


def test_specs_from_receivers_share_teachers_and_skip_cached_ones(tmp_path):
    tiny_llama_config(False).save_pretrained(tmp_path / "small")
    LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path / "big")
    receivers = [
        {"name": "a", "path": str(tmp_path / "small"), "dtype": "bfloat16",
         "teachers": [{"path": str(tmp_path / "big"), "weight": 1.0, "cache": ""}]},
        {"name": "b", "path": str(tmp_path / "small"), "dtype": "float32",
         "teachers": [{"path": str(tmp_path / "big"), "weight": 1.0, "cache": ""},
                      {"path": "meta-llama/Llama-3.1-70B-Instruct", "weight": 1.0, "cache": str(tmp_path)}]},
    ]
    specs = model_specs_from_receivers(receivers)
    assert [(s.name, s.role, s.dtype_bytes) for s in specs] == [
        ("a", "receiver", 2), ("b", "receiver", 4), ("teacher:big", "teacher", 2)]


def test_hub_names_are_resolved_before_the_tiny_prefix(tmp_path, monkeypatch, capsys):
    """`tiny:llama3` / `real:*` go through latentwire.hub (the planner reads the cached config.json); other paths
    are kept; `tiny:qwen2.5:teacher:float32` parses as path, role, dtype."""
    from latentwire import hub
    from launch import plan

    tiny_llama_config(False).save_pretrained(tmp_path / "llama3")
    asked = []
    monkeypatch.setattr(hub, "resolve", lambda name, cache=None: asked.append(name) or tmp_path / "llama3")
    monkeypatch.setattr("latentwire.tiny.build_tiny_receivers", lambda root: pytest.fail("tiny builder called"))
    assert plan.resolve_model_path("tiny:llama3") == str(tmp_path / "llama3")
    assert plan.resolve_model_path("real:qwen2.5-0.5b") == str(tmp_path / "llama3")
    assert plan.resolve_model_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert asked == ["tiny:llama3", "real:qwen2.5-0.5b"]
    assert plan._parse_model_arg("tiny:qwen2.5:teacher:float32") == ("tiny:qwen2.5", "teacher", "float32")
    assert plan.main(["--model", "tiny:llama3", "--gpus", "0", "--cpu_mem_gib", "16", "--world_size", "1"]) == 0
    assert "llama3" in capsys.readouterr().out and asked[-1] == "tiny:llama3"
