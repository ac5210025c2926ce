"""Two CPU ranks through the real `deepspeed` launcher: ZeRO-3 partitions the frozen receivers."""

import json

import pytest

from tests.conftest import deepspeed_cmd, read_jsonl, run_cli, small_overrides



@pytest.mark.slow
def test_two_rank_zero3_run_partitions_frozen_weights(tmp_path, tiny_dir):
    out = tmp_path / "z3"
    cmd = deepspeed_cmd(2) + ["launch/train.py", "--deepspeed", "ds_configs/zero3.json",
           "--config", "configs/tiny.json", "--output_dir", str(out)]
    for s in small_overrides(3):
        cmd += ["--set", s]
    run_cli(cmd, timeout=900)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    assert len(info["frozen_bytes_per_rank"]) == 2
    assert max(info["frozen_bytes_per_rank"]) <= 0.6 * info["frozen_bytes_total"]
    assert info["global_batch"] == info["micro_batch"] * info["grad_accum"] * 2
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["global_batch"] == info["global_batch"] for r in rows)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["receivers"]) == {"llama", "qwen"}
    ds_files = sorted(p.name for p in (out / "checkpoints" / "latest" / "ds").iterdir())
    assert ds_files == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
