"""Curriculum schedules (latentwire/curriculum.py): pure functions of the step, identical on every rank,
and the staged-M hand-off that keeps trained weights."""

import json
import os
import sys
import textwrap

import pytest
import torch

from latentwire import config as C
from latentwire import data as D
from latentwire import curriculum as CU
from latentwire.losses import hard_negative_weights
from latentwire.model import LatentWire
from latentwire.receivers import Receiver
from tests.conftest import ROOT, small_overrides
from tests.helpers import train_steps

SCHEDULE = ["curriculum.latent_keep_start=0.4", "curriculum.latent_keep_end=0.9", "curriculum.keep_ramp_steps=6",
            "curriculum.k_start=1", "curriculum.k_ramp_steps=6", "curriculum.first_tok_weight_start=2.0",
            "curriculum.first_tok_ramp_steps=4", "curriculum.text_warmup_steps=3"]


def tiny_cfg(extra=None):
    return C.load_config(ROOT / "configs" / "tiny.json", small_overrides(extra=extra or []))


def test_schedules_ramp_as_documented():
    cfg = tiny_cfg(SCHEDULE)
    assert [CU.k_at(cfg, s) for s in (0, 3, 6, 50)] == [1, 2, 4, 4]  # 1 -> losses.k_tokens=4 over 6 steps
    assert CU.keep_probability(cfg, 0) == pytest.approx(0.4) and CU.keep_probability(cfg, 99) == pytest.approx(0.9)
    assert [CU.first_token_weight(cfg, s) for s in (0, 2, 4)] == pytest.approx([2.0, 1.0, 0.0])
    assert [CU.text_blend(cfg, s) for s in (0, 3, 9)] == pytest.approx([1.0, 0.0, 0.0])
    default = tiny_cfg()
    assert CU.k_at(default, 0) == 4 and CU.keep_probability(default, 0) == 1.0
    assert CU.first_token_weight(default, 0) == 0.0 and CU.text_blend(default, 0) == 0.0


def test_accuracy_driven_k_advances_only_on_accurate_steps():
    cfg = tiny_cfg(["curriculum.k_start=2", "curriculum.k_acc_threshold=0.5"])
    state = {}
    assert CU.k_at(cfg, 100, state) == 2  # the step alone does not move it
    state = CU.advance_k(cfg, state, 0.4)
    assert CU.k_at(cfg, 0, state) == 2
    for _ in range(5):
        state = CU.advance_k(cfg, state, 0.8)
    assert CU.k_at(cfg, 0, state) == 4  # capped at losses.k_tokens


def test_adaptive_k_masks_targets_at_batch_start(tiny_receivers):
    cfg = tiny_cfg(["curriculum.k_start=1", "curriculum.k_ramp_steps=3"])
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:2]
    batch = D.collate(examples, {r.cfg.name: r.contract for r in tiny_receivers}, cfg.data.max_prompt_bytes, 4)
    model = type("M", (), {"cfg": cfg, "curriculum_state": {}})()
    values = CU.on_batch_start(model, batch, 0)
    assert values["curriculum/k"] == 1.0
    for rb in batch["receivers"].values():
        assert (rb["targets"][:, 1:] == -100).all() and (rb["targets"][:, 0] != -100).all()


def test_hard_negative_weights_keep_the_loss_scale():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50), torch.randn(6, 50)
    targets = torch.randint(0, 50, (6,))
    assert torch.allclose(hard_negative_weights(student, teacher, targets, 0.0), torch.ones(6))
    w = hard_negative_weights(student, teacher, targets, 3.0)
    assert w.mean() == pytest.approx(1.0) and w.shape == (6,)
    easy = student.clone()
    easy[0, targets[0]] = 50.0  # example 0 answered with certainty, teacher confident too
    sharp = teacher.clone()
    sharp[0, targets[0]] = 50.0
    w = hard_negative_weights(easy, sharp, targets, 3.0)
    assert w[0] == w.min() and w.mean() == pytest.approx(1.0)


def test_slot_dropout_keeps_one_slot_and_rescales():
    cfg = tiny_cfg(["curriculum.latent_keep_start=0.25", "curriculum.latent_keep_end=0.25"])
    z = torch.ones(16, cfg.encoder.m_shared + 2 * cfg.encoder.m_private, 3)
    out = CU.slot_dropout(z, cfg, 5)
    shared = out[:, :cfg.encoder.m_shared, 0]
    assert ((shared == 0) | (shared == 4.0)).all() and (shared > 0).any(dim=1).all()
    assert torch.equal(out[:, cfg.encoder.m_shared:], z[:, cfg.encoder.m_shared:])  # private slots untouched
    assert torch.equal(out, CU.slot_dropout(z, cfg, 5)) and not torch.equal(out, CU.slot_dropout(z, cfg, 6))


RANKS = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from latentwire import config as C
    from latentwire import curriculum as CU
    rank, out = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + out + ".rdv", rank=rank, world_size=2)
    cfg = C.load_config("configs/tiny.json", sys.argv[3:])
    z = torch.ones(4, cfg.encoder.m_shared + 2 * cfg.encoder.m_private, 2)
    state, rows = {}, []
    for step in range(10):
        # Each rank sees its own first-token accuracy; the trainer all-reduces it before the curriculum reads it.
        acc = torch.tensor([0.3 + 0.5 * rank if step % 2 else 0.9])
        dist.all_reduce(acc)
        state = CU.advance_k(cfg, state, float(acc) / 2)
        rows.append([CU.keep_probability(cfg, step), CU.k_at(cfg, step, state), CU.first_token_weight(cfg, step),
                     CU.text_blend(cfg, step), CU.stage_at(cfg, step), CU.slot_dropout(z, cfg, step).tolist()])
    gathered = [None, None]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        json.dump(gathered, open(out, "w"))
    dist.destroy_process_group()
""")


def test_curriculum_is_identical_on_two_ranks(tmp_path):
    import subprocess

    out = str(tmp_path / "ranks.json")
    sets = ["curriculum.latent_keep_start=0.5", "curriculum.keep_ramp_steps=8", "curriculum.k_start=1",
            "curriculum.k_acc_threshold=0.6", "curriculum.first_tok_weight_start=1.0",
            "curriculum.first_tok_ramp_steps=5",
            "curriculum.text_warmup_steps=4", "curriculum.m_stages=[8,6]", "curriculum.stage_steps=[5]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RANKS, str(r), out, *sets], cwd=ROOT, env=env)
             for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    rank0, rank1 = json.loads(open(out).read())
    assert rank0 == rank1
    assert [row[4] for row in rank0] == [0] * 5 + [1] * 5  # stage switches at step 5
    assert len({json.dumps(row[5]) for row in rank0}) > 1  # the dropout mask changes with the step


def test_stage_handoff_keeps_trained_weights(tiny_dir):
    cfg = tiny_cfg(["curriculum.m_stages=[8,6,4]", "curriculum.stage_steps=[2,4]", "features.latent_adapters=true",
                    "features.latent_adapter_dim=16"])
    receivers = [Receiver.load(r, cfg.data.max_answer_tokens) for r in cfg.receivers]
    torch.manual_seed(0)
    model = LatentWire(cfg, receivers)
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:2]
    batch = D.collate(examples, {r.cfg.name: r.contract for r in receivers}, cfg.data.max_prompt_bytes, 4)
    train_steps(model, batch, 2, lr=1e-2)
    assert CU.stage_at(cfg, 2) == 1
    old = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    from latentwire.train import handoff_model

    new = handoff_model(model, 1)
    assert new.cfg.encoder.m_shared == 6 and new.encoder.n_slots == 6 + 2 * cfg.encoder.m_private
    state = new.trainable_state_dict()
    assert set(state) == set(old)
    resized = {"encoder.pooler.queries", "adapters.llama.slot_pos", "adapters.qwen.slot_pos"}
    for key in set(old) - resized:
        assert torch.equal(state[key], old[key]), key
    for key in resized:
        before, after = old[key], state[key]
        assert after.shape[0] == before.shape[0] - 2
        assert torch.equal(after[0], before[0]) and torch.allclose(after[5], before[7])  # ends kept
        assert torch.equal(after[6:], before[8:])  # private slots carried over
    # The rebuilt model's hooks are the live ones: the new blocks fire, the old ones no longer do.
    fired = {"old": 0, "new": 0}
    model.feature_modules["latent_adapters"]["llama"]["1"].register_forward_hook(
        lambda *a: fired.__setitem__("old", fired["old"] + 1))
    new.feature_modules["latent_adapters"]["llama"]["1"].register_forward_hook(
        lambda *a: fired.__setitem__("new", fired["new"] + 1))
    new(batch, 2)
    assert fired == {"old": 0, "new": 1}


def test_data_stage_advances_on_its_validation_metric_or_its_step_cap():
    stage0 = ('curriculum.data_stages=[{"train_files": ["a.json"], "advance_at": 80.0}, '
              '{"train_files": ["b.json"], "max_steps": 5}]')
    cfg = tiny_cfg([stage0, "eval.every=10", "eval.best_metric=latent_first_tok_top1_mean"])
    assert CU.data_stage_after(cfg, 0, 0, 10, None) == 0  # no evaluation: stage 0 has no cap
    assert CU.data_stage_after(cfg, 0, 0, 10, 79.9) == 0
    assert CU.data_stage_after(cfg, 0, 0, 10, float("nan")) == 0
    assert CU.data_stage_after(cfg, 0, 0, 10, 80.0) == 1
    assert CU.data_stage_after(cfg, 1, 10, 14, None) == 1 and CU.data_stage_after(cfg, 1, 10, 15, None) == 2
    assert CU.data_stage_after(cfg, 2, 15, 10_000, 100.0) == 2  # the run's own data never ends
    nll = tiny_cfg([stage0, "eval.every=10", "eval.best_metric=latent_nll_mean",
                    "curriculum.data_stages.0.advance_at=2.5"])
    assert CU.data_stage_after(nll, 0, 0, 10, 2.6) == 0 and CU.data_stage_after(nll, 0, 0, 10, 2.5) == 1


@pytest.mark.parametrize("stage, message", [
    ({"advance_at": 50.0}, "data_stages.0.train_files"),
    ({"train_files": ["a.json"]}, "set advance_at"),
    ({"train_files": ["a.json"], "max_steps": -1}, "data_stages.0.max_steps"),
])
def test_bad_data_stages_name_the_key(stage, message):
    with pytest.raises(C.ConfigError, match=message):
        tiny_cfg([f"curriculum.data_stages=[{json.dumps(stage)}]", "eval.every=10"])
    with pytest.raises(C.ConfigError, match="eval.every must be > 0"):
        tiny_cfg(['curriculum.data_stages=[{"train_files": ["a.json"], "advance_at": 50.0}]'])


@pytest.mark.slow
def test_training_reads_each_data_stage_then_its_own_data_and_resumes_in_the_right_stage(tmp_path):
    """The trainer swaps training AND validation files at the stage boundary, records the stage in metrics.jsonl
    and in the checkpoint, and a resumed run continues in the stage it was in; the test split never changes."""
    from latentwire import toy
    from tests.conftest import read_jsonl, run_cli, train_cmd

    own = toy.write_splits(tmp_path / "own", n_train=64, n_val=8, n_test=8, facts="1-8")
    stage = toy.write_splits(tmp_path / "two", n_train=64, n_val=12, n_test=0, facts="2", eval_facts="2")
    out = tmp_path / "run"
    extra = [f'data.train_files=["{own["train"]}"]', f'data.val_files=["{own["validation"]}"]',
             f'data.eval_files=["{own["test"]}"]', "eval.every=1", "eval.periodic_examples=4", "eval.at_end=false",
             f'curriculum.data_stages=[{{"train_files": ["{stage["train"]}"], '
             f'"val_files": ["{stage["validation"]}"], "max_steps": 3}}]']
    proc = run_cli(train_cmd(out, steps=2, extra=extra))  # ends inside stage 0 (checkpoint step_2)
    assert "step 0: data stage 0 (curriculum.data_stages.0): 64 training and 12 validation examples" in proc.stdout
    assert "training ended inside curriculum.data_stages.0 (since step 0)" in proc.stdout
    state = json.loads((out / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert (state["data_stage"], state["data_stage_start"]) == (0, 0)
    info = json.loads((out / "run_info.json").read_text())
    assert info["splits"]["validation"]["n"] == 8  # the run's own splits, even while a stage runs
    assert [s["validation"]["n"] for s in info["data_stage_splits"]] == [12]
    proc = run_cli(train_cmd(out, steps=4, extra=extra))  # resumed inside stage 0: its 3-step cap still counts
    # the stage is re-entered with the step it began at (0), so the cap ends it after step 3, not step 5
    assert "at step 2" in proc.stdout and "step 0: data stage 0 (curriculum.data_stages.0)" in proc.stdout
    assert "step 3: data stage 1 (the run's own data): 64 training and 8 validation examples" in proc.stdout
    assert "training ended inside" not in proc.stdout
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["data_stage"] for r in rows] == [0, 0, 0, 1]
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert (state["data_stage"], state["data_stage_start"]) == (1, 3)
    proc = run_cli(train_cmd(out, steps=6, extra=extra))
    assert "at step 4" in proc.stdout and "step 3: data stage 1 (the run's own data)" in proc.stdout
    assert [r["data_stage"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [0, 0, 0, 1, 1, 1]


def test_an_empty_data_stage_is_refused_by_name_before_training(tmp_path):
    from latentwire import data as D
    from latentwire import toy

    own = toy.write_splits(tmp_path / "own", n_train=16, n_val=4, n_test=4)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "1.1", "data": []}))
    cfg = tiny_cfg([f'data.train_files=["{own["train"]}"]', f'data.val_files=["{own["validation"]}"]',
                    f'data.eval_files=["{own["test"]}"]', "eval.every=10",
                    f'curriculum.data_stages=[{{"train_files": ["{own["train"]}"], "max_steps": 5}}, '
                    f'{{"train_files": ["{empty}"], "max_steps": 5}}]'])
    splits = D.load_splits(cfg.data)
    with pytest.raises(ValueError, match=r"curriculum.data_stages.1.train_files .*empty.json.*: no training"):
        D.stage_splits(cfg.curriculum.data_stages[1], cfg.data, splits, "curriculum.data_stages.1")
