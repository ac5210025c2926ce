"""Larger same-tokenizer teachers: the tokenizer check, live vs cached KD, the KD mixing rule, the cache's guards,
and (slow) the cache writer and teacher training on 2 CPU ranks through the real launchers."""

import json
import re

import pytest
import torch
import torch.nn as nn

import kernels
from latentwire import config as C
from latentwire import data as D
from latentwire.losses import LMHeadLoss
from latentwire.model import LatentWire
from latentwire.teachers import CachedTeacher, TeacherError, TeacherLogits, load_teachers
from tests.conftest import ROOT, deepspeed_cmd, read_jsonl, run_cli, small_overrides

ALL_IDS = 10 ** 6  # --top_k above any vocabulary: the cache keeps every id (top_k = V)
SETS = ["data.max_prompt_bytes=256", "data.max_train_examples=16", "encoder.n_layers=2",
        "losses.text_teacher_weight=0"]  # KD from the larger teacher alone, so live and cached are comparable


@pytest.fixture(scope="module")
def teacher_dir(tiny_dir, tmp_path_factory):
    from latentwire.tiny import build_tiny_teacher

    return build_tiny_teacher(tiny_dir / "tiny-llama", tmp_path_factory.mktemp("teacher") / "llama-x2")


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, tmp_path_factory):
    """The cache of the teacher over the (16-example) training split, written in this process (one rank)."""
    from launch.cache_teacher import build_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(C.load_config(ROOT / "configs" / "tiny.json", SETS), str(teacher_dir), out, top_k=ALL_IDS,
                batch_size=5)
    return out


def _config(*extra: str) -> C.Config:
    return C.load_config(ROOT / "configs" / "tiny.json", SETS + list(extra))


def _batch(cfg, receivers, examples):
    return D.collate(examples, {r.cfg.name: r.contract for r in receivers}, cfg.data.max_prompt_bytes,
                     cfg.losses.k_tokens)


def test_teacher_with_another_tokenizer_is_refused_naming_both(tiny_dir, tiny_receivers):
    qwen_path = str(tiny_dir / "tiny-qwen2")  # a Qwen2 tokenizer as a teacher of the Llama receiver
    cfg = _config(f"receivers.0.teachers.0.path={qwen_path}")
    with pytest.raises(TeacherError) as err:
        load_teachers(cfg, tiny_receivers, {})
    msg = str(err.value)
    assert f"teacher '{qwen_path}'" in msg and "receiver 'llama' ('tiny:llama')" in msg, msg
    assert "bos_token_id" in msg, msg  # the Llama tokenizer has a BOS, the Qwen2 one has none

    from launch.cache_teacher import pick_receiver
    from latentwire.receivers import load_tokenizer

    with pytest.raises(TeacherError, match="shares the tokenizer of no receiver"):
        pick_receiver(C.load_config(ROOT / "configs" / "tiny.json", ["receivers.1.path=tiny:llama"]),
                      qwen_path, load_tokenizer(qwen_path), None)


def test_cache_layout(cache_dir, tiny_receivers):
    from safetensors import safe_open

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    vocab = tiny_receivers[0].model.get_output_embeddings().weight.shape[0]
    assert manifest["receiver"] == "llama" and manifest["k_tokens"] == 4 and manifest["temperature"] == 1.0
    assert manifest["top_k"] == vocab and manifest["n_examples"] == 16
    assert manifest["teacher_tokenizer"] == manifest["tokenizer"]
    assert [s["file"] for s in manifest["shards"]] == ["shard_0.safetensors"]
    train = D.load_splits(_config().data)[0]
    with safe_open(str(cache_dir / "shard_0.safetensors"), framework="pt") as shard:
        for ex in train:
            ids, logprobs = shard.get_tensor(f"{ex.id}.ids"), shard.get_tensor(f"{ex.id}.logprobs")
            assert ids.shape == logprobs.shape == (4, vocab) and ids.dtype == torch.int64
            assert torch.equal(ids.sort(dim=1).values, torch.arange(vocab).expand(4, -1))  # a permutation per row
            assert torch.allclose(logprobs.exp().sum(1), torch.ones(4), atol=1e-5)
            assert bool((logprobs[:, 1:] <= logprobs[:, :-1]).all())
            n_answer = len(tiny_receivers[0].contract.answer_ids(ex.answers[0]))
            assert int(shard.get_tensor(f"{ex.id}.valid")[0]) == min(4, n_answer)


def test_live_and_cached_teacher_give_the_same_kd(teacher_dir, cache_dir, tiny_receivers):
    live_cfg = _config(f"receivers.0.teachers.0.path={teacher_dir}")
    cached_cfg = _config(f"receivers.0.teachers.0.cache={cache_dir}")
    train = D.load_splits(live_cfg.data)[0]
    batch = _batch(live_cfg, tiny_receivers, train[3:8])  # 5 examples, answers of several lengths
    results = []
    for cfg in (live_cfg, cached_cfg):
        torch.manual_seed(0)
        model = LatentWire(cfg, tiny_receivers)
        names_before = [n for n, _ in model.named_parameters()]
        keys_before = list(model.state_dict())
        model.attach_teachers(load_teachers(cfg, tiny_receivers, {}))
        # Teachers are outside the module tree: no optimizer state, nothing in checkpoints.
        assert [n for n, _ in model.named_parameters()] == names_before and list(model.state_dict()) == keys_before
        out = model(batch, 0)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["parts"], grads))
    (live, live_grads), (cached, cached_grads) = results
    assert live["kd/llama"] > 0 and "kd/qwen" not in live  # text_teacher_weight = 0: qwen has no KD teacher
    assert abs(live["kd/llama"] - cached["kd/llama"]) < 1e-5, (live["kd/llama"], cached["kd/llama"])
    assert live["ce/llama"] == cached["ce/llama"]
    assert live_grads.keys() == cached_grads.keys() and live_grads
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kd_mixes_dense_teachers_as_one_mixture_and_cached_teachers_by_weight():
    torch.manual_seed(0)
    b, k, h, v = 3, 4, 8, 37
    head = nn.Linear(h, v, bias=False)
    student, text_hidden = torch.randn(b, k, h), torch.randn(b, k, h)
    live_logits, cached_logits = torch.randn(1, b, k, v) * 3, torch.randn(b, k, v) * 3
    targets = torch.randint(0, v, (b, k))
    targets[0, 2:] = -100
    top_logprobs, top_ids = torch.log_softmax(cached_logits / 2.0, -1).topk(v, dim=-1)
    out = LMHeadLoss(head)(student, targets, text_hidden, temperature=2.0, extra_teacher_logits=live_logits,
                           teacher_weights=[1.0, 2.0], cached_teachers=[(top_ids, top_logprobs, 3.0)])
    mask = (targets != -100).reshape(-1)
    flat = student.reshape(b * k, h)
    dense = kernels.kd_softmax_loss(flat, head.weight, torch.stack([text_hidden @ head.weight.t(), live_logits[0]])
                                    .reshape(2, b * k, v), 2.0, torch.tensor([1.0, 2.0]), mask)
    cached = kernels.kd_softmax_loss(flat, head.weight, cached_logits.reshape(1, b * k, v), 2.0, None, mask)
    torch.testing.assert_close(out["kd"], (3.0 * dense + 3.0 * cached) / 6.0, rtol=1e-5, atol=1e-6)


def test_teacher_vocabulary_is_fitted_to_the_receiver():
    head = nn.Linear(4, 12, bias=False)
    hidden = torch.randn(2, 3, 4)
    full = (hidden @ head.weight.t()).detach()
    torch.testing.assert_close(TeacherLogits(head, 10, 10, "t")(hidden), full[..., :10])  # padding rows dropped
    padded = TeacherLogits(head, 14, 11, "t")(hidden)  # the receiver has more padding rows than the teacher
    assert padded.shape == (2, 3, 14) and bool((padded[..., 12:] == float("-inf")).all())
    torch.testing.assert_close(padded[..., :12], full)
    with pytest.raises(TeacherError, match="12 rows, fewer than the 13 tokens"):
        TeacherLogits(head, 14, 13, "t")


@pytest.mark.parametrize("override, field", [("losses.k_tokens=3", "k_tokens"),
                                             ("losses.kd_temperature=2.0", "temperature")])
def test_manifest_mismatch_is_an_error_naming_the_field(cache_dir, tiny_receivers, override, field):
    cfg = _config(override)
    with pytest.raises(TeacherError, match=rf"manifest field '{field}' is .* but this run expects"):
        CachedTeacher(str(cache_dir), 1.0, tiny_receivers[0], cfg)


def test_missing_or_changed_example_is_an_error_naming_the_id(cache_dir, tiny_receivers):
    cfg = _config(f"receivers.0.teachers.0.cache={cache_dir}")
    teacher = CachedTeacher(str(cache_dir), 1.0, tiny_receivers[0], cfg)
    train, _, evals = D.load_splits(cfg.data)
    batch = _batch(cfg, tiny_receivers, [train[0], evals[0]])
    with pytest.raises(TeacherError, match=re.escape(f"example id '{evals[0].id}' is not in the cache")):
        teacher.lookup(batch["ids"], batch["receivers"]["llama"])
    changed = D.Example(**{**train[1].__dict__, "question": train[1].question + " really?"})
    batch = _batch(cfg, tiny_receivers, [train[0], changed])
    with pytest.raises(TeacherError, match=re.escape(f"example id '{changed.id}' was cached from a different text")):
        teacher.lookup(batch["ids"], batch["receivers"]["llama"])


def _partition(stdout: str) -> tuple[int, int]:
    """(resident, total) parameter bytes of the ZeRO-3 teacher on rank 0, from its log line."""
    found = re.search(r"ZeRO-3 inference engine, (\d+) of (\d+) parameter bytes", stdout)
    assert found, stdout[-3000:]
    return int(found.group(1)), int(found.group(2))


@pytest.mark.slow
def test_two_rank_cache_and_zero3_live_teacher_give_the_same_kd(tmp_path, tiny_dir, teacher_dir):
    """deepspeed on 2 CPU ranks: cache the teacher (ranks split the data; the teacher ZeRO-3-partitioned), train
    2 steps with the cache, and 2 steps with the teacher live in its own ZeRO-3 inference engine: same KD loss."""
    sets = small_overrides(2, SETS + ["eval.at_end=false"])
    cache = tmp_path / "cache"
    cmd = deepspeed_cmd(2) + ["launch/cache_teacher.py", "--config", "configs/tiny.json", "--teacher",
                              str(teacher_dir), "--out", str(cache), "--top_k", str(ALL_IDS), "--batch_size", "3",
                              "--deepspeed", "ds_configs/zero3.json"]
    proc = run_cli(cmd + [a for s in sets for a in ("--set", s)], timeout=900)
    resident, total = _partition(proc.stdout)
    assert 0 < resident <= 0.6 * total
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["n_examples"] for s in manifest["shards"]] == [8, 8] and manifest["n_examples"] == 16

    runs = {}
    for kind, teacher in (("cached", f"cache={cache}"), ("live", f"path={teacher_dir}")):
        out = tmp_path / kind
        cmd = deepspeed_cmd(2) + ["launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config",
                                  "configs/tiny.json", "--output_dir", str(out)]
        proc = run_cli(cmd + [a for s in sets + [f"receivers.0.teachers.0.{teacher}"] for a in ("--set", s)],
                       timeout=900)
        runs[kind] = (proc.stdout, read_jsonl(out / "metrics.jsonl"), json.loads((out / "run_info.json").read_text()))
    live_out, live_rows, live_info = runs["live"]
    _, cached_rows, cached_info = runs["cached"]
    assert [r["step"] for r in live_rows] == [r["step"] for r in cached_rows] == [1, 2]
    assert abs(live_rows[0]["kd/llama"] - cached_rows[0]["kd/llama"]) < 1e-5
    assert abs(live_rows[1]["kd/llama"] - cached_rows[1]["kd/llama"]) < 1e-4
    # The live teacher was partitioned over the two ranks, and it is not part of the trained engine.
    resident, total = _partition(live_out)
    assert 0 < resident <= 0.6 * total
    assert live_info["frozen_bytes_total"] == cached_info["frozen_bytes_total"]
    assert live_info["trainable_params"] == cached_info["trainable_params"]
