"""Data: readers, article split, byte budget, deterministic order, collation and its targets."""

import json

import pytest
import torch

from latentwire import data as D
from latentwire.config import DataConfig
from tests.conftest import SHARED_DATA


def test_embedded_sample_reads_and_splits_by_article():
    train, val, test = D.load_splits(DataConfig())
    assert len(train) > 300 and len(val) > 20 and len(test) > 20
    articles = [{e.article for e in side} for side in (train, val, test)]
    assert not articles[0] & articles[1] and not articles[0] & articles[2] and not articles[1] & articles[2]
    again = D.load_splits(DataConfig())
    assert [e.id for e in again.test] == [e.id for e in test] and [e.id for e in again.validation] == [e.id for e in val]
    other = D.load_splits(DataConfig(seed=1))
    assert {e.article for e in other.train} != articles[0]


def test_squad_keeps_every_gold_answer():
    examples = D.read_file(str(D.EMBEDDED_SQUAD))
    assert any(len(ex.answers) > 1 for ex in examples)
    assert all(ex.answers and ex.question and ex.context for ex in examples)


def test_prompt_byte_budget_cuts_context_at_utf8_boundary():
    ex = D.Example("1", "squad", "a", "Zürich " * 100, "Where?", ["Zürich"])
    stats = D.DataStats()
    text = D.prompt_text(ex, 101, stats)
    assert len(text.encode("utf-8")) <= 101
    assert text.endswith("Question: Where?\n")
    assert stats.prompts_truncated == 1
    text.encode("utf-8").decode("utf-8")  # valid UTF-8


def test_order_is_function_of_seed_and_world_layout_independent():
    n, seed = 50, 3
    one_rank = D.micro_batch_indices(5, 4, 0, 1, 0, 1, n, seed)
    two_ranks = D.micro_batch_indices(5, 2, 0, 1, 0, 2, n, seed) + D.micro_batch_indices(5, 2, 0, 1, 1, 2, n, seed)
    assert one_rank == two_ranks
    accum = D.micro_batch_indices(5, 2, 0, 2, 0, 1, n, seed) + D.micro_batch_indices(5, 2, 1, 2, 0, 1, n, seed)
    assert accum == one_rank
    epoch = [D.example_index(p, n, seed) for p in range(n)]
    assert sorted(epoch) == list(range(n))


def test_bad_files_name_the_culprit(tmp_path):
    with pytest.raises(D.DataError, match="dataset file not found"):
        D.read_file(str(tmp_path / "missing.json"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(D.DataError, match="empty"):
        D.read_file(str(tmp_path / "empty.jsonl"))
    rows = [{"id": "a", "context": "c", "question": "q?", "answers": {"text": ["x"], "answer_start": [0]}},
            {"id": "b", "context": "c", "answers": {"text": ["x"], "answer_start": [0]}}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(D.DataError, match=r"rows.jsonl: record 2.*question"):
        D.read_file(str(tmp_path / "rows.jsonl"), "squad")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: not valid JSON"):
        D.read_file(str(tmp_path / "bad.jsonl"))


def test_squad_rows_layout_through_datasets_parquet(tmp_path):
    import datasets

    rows = {"id": ["q1"], "title": ["T"], "context": ["Paris is in France."], "question": ["Where is Paris?"],
            "answers": [{"text": ["France"], "answer_start": [12]}]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "squad.parquet"))
    examples = D.read_file(str(tmp_path / "squad.parquet"))
    assert examples[0].answers == ["France"] and examples[0].question == "Where is Paris?"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")
def test_shared_hotpot_and_nq_readers():
    hot = D.read_file(str(SHARED_DATA / "hotpotqa" / "dev_distractor_part1.jsonl"))
    assert len(hot) == 300 and all(ex.source == "hotpot" for ex in hot)
    nq = D.read_file(str(SHARED_DATA / "nq_open" / "nq-open-oracle.jsonl.gz"))
    assert len(nq) == 2655 and all(ex.context for ex in nq)


def test_collate_targets_and_sequences(tiny_receivers):
    contracts = {r.cfg.name: r.contract for r in tiny_receivers}
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:3]
    batch = D.collate(examples, contracts, 512, k_tokens=4)
    assert batch["bytes"].shape[0] == 3 and batch["byte_mask"].dtype == torch.bool
    for r in tiny_receivers:
        c, rb = r.contract, batch["receivers"][r.cfg.name]
        for i, ex in enumerate(examples):
            answer = c.answer_ids(ex.answers[0])
            targets = [t for t in rb["targets"][i].tolist() if t != -100]
            assert targets == answer[:4]
            assert c.pad_id not in targets or c.pad_id == c.eos_id
            if c.bos_id is not None:
                assert c.bos_id not in targets
            n = len(answer)
            start = rb["latent_answer_start"]
            assert rb["latent_ids"][i, :start].tolist() == c.latent_prefix_ids()
            assert rb["latent_ids"][i, start:start + n].tolist() == answer
            t0 = int(rb["text_answer_start"][i])
            assert rb["text_ids"][i, t0:t0 + n].tolist() == answer
            assert rb["text_ids"][i, t0 - len(c.anchor_ids):t0].tolist() == c.anchor_ids
        if r.cfg.name == "qwen":
            assert not c.latent_bos and not c.text_bos
        else:
            assert c.latent_bos and rb["text_ids"][0, 0] == c.bos_id
