"""Staged latent length inside the trainer: hand-off at the stage boundary, resume across it, eval after it."""

import json

from tests.conftest import read_jsonl, run_cli, train_cmd

STAGED = ["encoder.m_shared=8", "curriculum.m_stages=[8,6]", "curriculum.stage_steps=[2]", "eval.at_end=false"]


def test_stage_hand_off_in_training_and_resume(tmp_path, tiny_dir):
    out = tmp_path / "staged"
    proc = run_cli(train_cmd(out, 2, STAGED))
    assert json.loads((out / "checkpoints" / "latest" / "config.json").read_text())["encoder"]["m_shared"] == 8
    proc = run_cli(train_cmd(out, 4, STAGED))
    assert "latent stage 1, m_shared 8 -> 6" in proc.stdout
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    saved = json.loads((out / "checkpoints" / "latest" / "config.json").read_text())
    assert saved["encoder"]["m_shared"] == 6
    run_cli(["launch/eval.py", "--checkpoint", str(out / "checkpoints" / "latest"), "--output_dir", str(tmp_path / "e"),
             "--set", "eval.max_examples=2", "--set", "eval.embed_replay=false"])
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["wire"]["latent_slots"] == 6 + 2 * 4
