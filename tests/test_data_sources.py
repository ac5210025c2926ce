"""Dataset readers on every supported layout (SQuAD official / HF rows, HotpotQA HF / original, NQ-open oracle),
the byte cap with its truncation count, and deterministic weighted mixing. Tests on ../shared/data skip without it."""

import gzip
import json
from collections import Counter

import pytest

from latentwire import data as D
from latentwire.config import DataConfig
from tests.conftest import SHARED_DATA

HOTPOT = SHARED_DATA / "hotpotqa"
NQ_ORACLE = SHARED_DATA / "nq_open" / "nq-open-oracle.jsonl.gz"
needs_shared = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is absent")

HOTPOT_ROW = {
    "id": "h1", "question": "Which city hosts both clubs?", "answer": "Leeds", "type": "bridge", "level": "easy",
    "supporting_facts": {"title": ["B club", "A club"], "sent_id": [0, 0]},
    "context": {"title": ["A club", "B club", "C club"],
                "sentences": [["A club plays in Leeds.", " It was founded in 1904."], ["B club is in Leeds."],
                              ["C club is elsewhere."]]},
}


def _to_original_layout(row: dict) -> dict:
    """HF `hotpot_qa` row -> the original HotpotQA JSON record (`_id`, list-of-lists context)."""
    ctx = row["context"]
    facts = row["supporting_facts"]
    return {"_id": row["id"], "question": row["question"], "answer": row["answer"], "type": row["type"],
            "level": row["level"], "supporting_facts": [[t, i] for t, i in zip(facts["title"], facts["sent_id"])],
            "context": [[t, s] for t, s in zip(ctx["title"], ctx["sentences"])]}


def test_hotpot_both_layouts_build_the_same_context_from_every_paragraph_in_order(tmp_path):
    (tmp_path / "hf.jsonl").write_text(json.dumps(HOTPOT_ROW) + "\n")
    (tmp_path / "orig.json").write_text(json.dumps([_to_original_layout(HOTPOT_ROW)]))
    (hf,) = D.read_file(str(tmp_path / "hf.jsonl"))
    (orig,) = D.read_file(str(tmp_path / "orig.json"))
    assert hf == orig
    assert hf.source == "hotpot" and hf.id == "h1" and hf.answers == ["Leeds"]
    assert hf.context == ("A club: A club plays in Leeds. It was founded in 1904.\nB club: B club is in Leeds.\n"
                          "C club: C club is elsewhere.")


def test_hotpot_byte_cap_counts_each_truncated_prompt():
    ex = D._hotpot_row(HOTPOT_ROW, "row")
    full = len(D.prompt_text(ex, 10_000).encode())
    stats = D.DataStats()
    kept = D.prompt_text(ex, full, stats)
    cut = D.prompt_text(ex, full - 20, stats)
    assert stats.prompts_truncated == 1 and kept.encode() == D.prompt_text(ex, 10_000).encode()
    assert len(cut.encode()) <= full - 20 and cut.endswith(f"Question: {ex.question}\n")
    assert cut.startswith("Context: A club: A club plays in Leeds.")  # the first paragraphs survive the cut


def test_nq_oracle_reads_the_gold_passage(tmp_path):
    row = {"question": "who founded the club", "answers": ["Ann Smith", "Smith"],
           "ctxs": [{"title": "Other", "text": "Unrelated.", "isgold": False},
                    {"title": "Club", "text": "Ann Smith founded the club.", "hasanswer": True, "isgold": True}]}
    with gzip.open(tmp_path / "nq.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(row) + "\n")
    (ex,) = D.read_file(str(tmp_path / "nq.jsonl.gz"))
    assert (ex.source, ex.id, ex.context, ex.answers) == ("nq", "nq-0", "Club: Ann Smith founded the club.",
                                                          ["Ann Smith", "Smith"])
    (tmp_path / "open.jsonl").write_text(json.dumps({"question": "q", "answer": ["a"]}) + "\n")
    with pytest.raises(D.DataError, match="no passage"):
        D.read_file(str(tmp_path / "open.jsonl"))


def test_squad_official_and_row_layouts_agree(tmp_path):
    (official,) = D.read_file(str(D.EMBEDDED_SQUAD))[:1]
    row = {"id": official.id, "title": official.article, "context": official.context, "question": official.question,
           "answers": {"text": official.answers, "answer_start": [0] * len(official.answers)}}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    (from_rows,) = D.read_file(str(tmp_path / "rows.jsonl"))
    assert from_rows == official


def test_weighted_mixing_is_deterministic_and_follows_the_weights():
    a = [D.Example(f"a{i}", "squad", f"a{i}", "c", "q", ["x"]) for i in range(300)]
    b = [D.Example(f"b{i}", "nq", f"b{i}", "c", "q", ["x"]) for i in range(100)]
    mixed = D.mix([a, b], [1.0, 3.0], seed=5)
    assert [e.id for e in mixed] == [e.id for e in D.mix([a, b], [1.0, 3.0], seed=5)]
    assert [e.id for e in mixed] != [e.id for e in D.mix([a, b], [1.0, 3.0], seed=6)]
    share = Counter(e.source for e in mixed)["nq"] / len(mixed)
    assert len(mixed) == 400 and 0.68 < share < 0.82
    # Each source is read in order and only cycles once exhausted.
    a_ids = [e.id for e in mixed if e.source == "squad"]
    assert a_ids == [f"a{i}" for i in range(len(a_ids))]
    by_size = Counter(e.source for e in D.mix([a, b], [], seed=5))
    assert by_size["squad"] > by_size["nq"]


@needs_shared
def test_shared_hotpot_files_in_both_layouts(tmp_path):
    rows = [json.loads(line) for line in (HOTPOT / "dev_distractor_part1.jsonl").read_text().splitlines()]
    examples = D.read_file(str(HOTPOT / "dev_distractor_part1.jsonl"))
    assert len(examples) == 300 and {e.source for e in examples} == {"hotpot"}
    for row, ex in zip(rows, examples):
        assert ex.id == row["id"] and ex.answers == [row["answer"]] and ex.question == row["question"]
        paragraphs = zip(row["context"]["title"], row["context"]["sentences"])
        assert ex.context == "\n".join(f"{t}: {''.join(s)}" for t, s in paragraphs)  # all paragraphs, in order
    (tmp_path / "orig.json").write_text(json.dumps([_to_original_layout(r) for r in rows[:50]]))
    assert D.read_file(str(tmp_path / "orig.json")) == examples[:50]
    sizes = {p.name: len(D.read_file(str(p))) for p in sorted(HOTPOT.glob("dev_distractor_part*.jsonl"))}
    assert sizes == {"dev_distractor_part1.jsonl": 300, "dev_distractor_part2.jsonl": 300,
                     "dev_distractor_part3.jsonl": 500}
    stats = D.DataStats()
    prompts = [D.prompt_text(ex, 768, stats) for ex in examples]
    too_long = sum(len(D.prompt_text(ex, 10**6).encode()) > 768 for ex in examples)
    assert stats.prompts_truncated == too_long > 250  # distractor contexts are long: the cap is counted
    assert all(len(p.encode()) <= 768 and p.endswith(f"Question: {e.question}\n") for p, e in zip(prompts, examples))


@needs_shared
def test_shared_nq_oracle_pairs_every_question_with_its_gold_passage():
    with gzip.open(NQ_ORACLE, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    examples = D.read_file(str(NQ_ORACLE))
    assert len(examples) == len(rows) == 2655 and {e.source for e in examples} == {"nq"}
    for row, ex in zip(rows, examples):
        gold = next(c for c in row["ctxs"] if c.get("isgold"))
        assert ex.context == f"{gold['title']}: {gold['text']}" and ex.answers == row["answers"]
    with pytest.raises(D.DataError, match="no passage"):
        D.read_file(str(SHARED_DATA / "nq_open" / "NQ-open.dev.jsonl"))


@needs_shared
def test_shared_files_mix_into_one_example_stream():
    cfg = DataConfig(train_files=[str(HOTPOT / "dev_distractor_part1.jsonl"), str(NQ_ORACLE)],
                     eval_files=[str(HOTPOT / "dev_distractor_part2.jsonl")],
                     val_files=[str(HOTPOT / "dev_distractor_part3.jsonl")], mix_weights=[1.0, 1.0], seed=3)
    train, val, test = D.load_splits(cfg)
    again = D.load_splits(cfg)
    assert [e.id for e in train] == [e.id for e in again.train]
    assert 0.4 < Counter(e.source for e in train)["hotpot"] / len(train) < 0.6
    assert Counter(e.source for e in test) == {"hotpot": 300} and Counter(e.source for e in val) == {"hotpot": 500}
    # A file read as training data and again as test data is refused: nothing may be scored on what trained it.
    with pytest.raises(D.DataError, match="overlap"):
        D.load_splits(DataConfig(train_files=[str(NQ_ORACLE)], eval_files=[str(NQ_ORACLE)]))
    squad = D.read_file(str(SHARED_DATA / "squad" / "dev-v1.1.json"))
    assert len(squad) == 10570 and sum(len(e.answers) > 1 for e in squad) > 5000
