"""launch/sweep.py: grid expansion, dry run, and the results table collected from run directories."""

import csv
import json

import pytest

from launch import sweep
from tests.conftest import ROOT, run_cli


def test_expand_crosses_named_runs_with_the_grid():
    spec = {"config": "configs/tiny.json", "set": ["train.max_steps=3"],
            "runs": {"base": [], "lora": ["features.lora=true"]},
            "grid": {"losses.kd_weight": [0.0, 0.5], "encoder.m_shared": [4]}}
    variants = sweep.expand(spec)
    assert [n for n, _ in variants] == ["base_kd_weight=0.0_m_shared=4", "base_kd_weight=0.5_m_shared=4",
                                        "lora_kd_weight=0.0_m_shared=4", "lora_kd_weight=0.5_m_shared=4"]
    assert variants[3][1] == ["train.max_steps=3", "features.lora=true", "losses.kd_weight=0.5", "encoder.m_shared=4"]
    with pytest.raises(ValueError, match="unknown key"):
        sweep.expand({"runz": {}})


def test_shipped_feature_sweep_is_valid_and_dry_runs():
    from latentwire import config as C

    spec = json.loads((ROOT / "configs" / "ablation" / "features.json").read_text())
    variants = sweep.expand(spec)
    assert [n for n, _ in variants] == ["baseline", "default", "lora", "deep_prefix", "latent_adapters",
                                        "coprocessor"]
    for _, overrides in variants:  # every variant is a valid config
        C.load_config(ROOT / spec["config"], overrides)
    proc = run_cli(["launch/sweep.py", "--config", "configs/ablation/features.json", "--dry_run",
                    "--set", "train.max_steps=2"])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 6 and all("--set train.max_steps=2" in line for line in lines)
    assert "features.coprocessor=true" in lines[-1]


def test_collect_writes_csv_and_markdown(tmp_path):
    run = tmp_path / "lora"
    (run / "eval").mkdir(parents=True)
    receiver = {"latent": {"em": 12.5, "f1": 20.0, "first_tok_top1": 50.0, "nll": 3.25},
                "text": {"em": 40.0, "f1": 55.0}}
    (run / "eval" / "metrics.json").write_text(json.dumps({"receivers": ["llama"], "llama": receiver,
                                                           "features": ["lora"]}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n" +
                                       json.dumps({"step": 2, "loss": 4.5}) + "\n")
    rows = [sweep.collect("lora", run, "ok"), sweep.collect("broken", tmp_path / "missing", "failed (exit 1)")]
    assert rows[0]["features"] == "lora" and rows[0]["llama/latent_f1"] == 20.0 and rows[0]["final_loss"] == 4.5
    sweep.write_tables(rows, tmp_path)
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["run"] for r in table] == ["lora", "broken"] and table[1]["status"] == "failed (exit 1)"
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | status | features |") and len(md) == 4
