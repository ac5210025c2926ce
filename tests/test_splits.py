"""Three disjoint splits for every reader: train, validation (everything decided during training) and test (the
final evaluation only). Disjoint by CONTENT, not only by id: no normalised (question, context) pair and no grouping
key (SQuAD article title, toy person, HotpotQA / NQ normalised question) is in two splits. Also: `NAME:SPLIT`
dataset specs on a local directory in the Hugging Face layout (never the network), split digests."""

import json

import pytest

from latentwire import data as D
from latentwire import toy
from latentwire.config import DataConfig
from tests.conftest import SHARED_DATA

SQUAD_DEV = SHARED_DATA / "squad" / "dev-v1.1.json"
HOTPOT = SHARED_DATA / "hotpotqa" / "dev_distractor_part1.jsonl"
NQ_ORACLE = SHARED_DATA / "nq_open" / "nq-open-oracle.jsonl.gz"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def assert_disjoint_by_content(splits: D.Splits) -> None:
    """Recomputed here from the examples' text, independently of `data.check_disjoint`."""
    def keys(examples):
        pairs = {(" ".join(e.question.lower().split()), " ".join(e.context.lower().split())) for e in examples}
        return pairs, {e.article for e in examples}

    sides = [keys(s) for s in splits]
    assert all(len(s) for s in splits), [len(s) for s in splits]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not sides[i][0] & sides[j][0], (splits._fields[i], splits._fields[j], "share a (question, context)")
            assert not sides[i][1] & sides[j][1], (splits._fields[i], splits._fields[j], "share a grouping key")


def test_embedded_squad_official_layout():
    splits = D.load_splits(DataConfig())
    assert_disjoint_by_content(splits)


def _hf_squad_rows(examples):
    return [{"id": e.id, "title": e.article, "context": e.context, "question": e.question,
             "answers": {"text": e.answers, "answer_start": [0] * len(e.answers)}} for e in examples]


def test_squad_hf_rows_layout(tmp_path):
    rows = _hf_squad_rows(D.read_file(str(D.EMBEDDED_SQUAD)))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = D.load_splits(DataConfig(train_files=[str(path)]))
    assert_disjoint_by_content(splits)
    assert sum(len(s) for s in splits) == len(rows)


@needs_shared
def test_squad_dev_file_and_hotpot_and_nq():
    for files, fraction in (([str(SQUAD_DEV)], 0.1), ([str(HOTPOT)], 0.2), ([str(NQ_ORACLE)], 0.2)):
        splits = D.load_splits(DataConfig(train_files=files, eval_fraction=fraction, val_fraction=fraction))
        assert_disjoint_by_content(splits)


@needs_shared
def test_nq_duplicate_questions_stay_in_one_split():
    """Grouping by the normalised question keeps every copy of a question (case or spacing aside) on one side."""
    splits = D.load_splits(DataConfig(train_files=[str(NQ_ORACLE)]))
    where = {}
    for name, examples in zip(splits._fields, splits):
        for e in examples:
            where.setdefault(" ".join(e.question.lower().split()), set()).add(name)
    assert all(len(sides) == 1 for sides in where.values())


def test_toy_world_files(tmp_path):
    paths = toy.write_splits(tmp_path, n_train=400, n_val=64, n_test=64, facts="2-4", eval_facts="4", seed=5)
    splits = D.load_splits(DataConfig(train_files=[str(paths["train"])], val_files=[str(paths["validation"])],
                                      eval_files=[str(paths["test"])]))
    assert_disjoint_by_content(splits)
    # Every person NAMED in a context (not only the one asked about) belongs to its split's people.
    people = toy.people_splits()
    for name, examples in zip(("train", "validation", "test"), splits):
        named = {f"{f} {s}" for e in examples for f, s, _ in toy.facts_in(e.context)}
        assert named <= {f"{f} {s}" for f, s in people[name]}, name


def test_overlapping_files_are_refused_naming_the_splits(tmp_path):
    with pytest.raises(D.DataError, match="the train and test splits overlap"):
        D.load_splits(DataConfig(eval_files=[str(D.EMBEDDED_SQUAD)]))
    one = D.read_file(str(D.EMBEDDED_SQUAD))[:1]
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(_hf_squad_rows(one)[0] | {"id": "renamed", "title": "another title"}) + "\n")
    # Same question and context under another id and title: still caught, by content.
    with pytest.raises(D.DataError, match="1 \\(question, context\\) pairs"):
        D.load_splits(DataConfig(val_files=[str(path)]))


def test_dataset_split_specs_on_a_local_hf_directory(tmp_path):
    """`NAME:SPLIT` reads one split of a datasets directory, exactly as a hub id such as `rajpurkar/squad:train`
    is read (the hub itself is never contacted in tests)."""
    examples = D.read_file(str(D.EMBEDDED_SQUAD))
    articles = sorted({e.article for e in examples})
    root = tmp_path / "squad_hf"
    root.mkdir()
    for split, chosen in (("train", articles[:4]), ("validation", articles[4:])):
        rows = _hf_squad_rows([e for e in examples if e.article in chosen])
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = D.read_file(f"{root}:train")
    test = D.read_file(f"{root}:validation")
    assert {e.article for e in train} == set(articles[:4]) and {e.article for e in test} == set(articles[4:])
    splits = D.load_splits(DataConfig(train_files=[f"{root}:train"], eval_files=[f"{root}:validation"]))
    assert_disjoint_by_content(splits)
    assert len(splits.test) == len(test)
    with pytest.raises(D.DataError, match="split 'nope'"):
        D.read_file(f"{root}:nope")
    with pytest.raises(D.DataError, match="names no split"):
        D.read_file("someone/some_dataset")


def test_split_digest_is_over_sorted_ids():
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:5]
    a, b = D.split_digest(examples), D.split_digest(list(reversed(examples)))
    assert a == b and a["n"] == 5 and len(a["sha256"]) == 64
    assert D.split_digest(examples[:4]) != a


def test_split_digest_tells_apart_sets_that_reuse_ids():
    """The toy world's validation files of different stages reuse ids; checkpoints/best must see two sets."""
    import dataclasses

    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:5]
    other = [dataclasses.replace(ex, context=ex.context + " More.") for ex in examples]
    a, b = D.split_digest(examples), D.split_digest(other)
    assert a["sha256"] == b["sha256"] and a["content_sha256"] != b["content_sha256"]
    assert D.split_digest(list(reversed(examples)))["content_sha256"] == a["content_sha256"]


def test_best_checkpoint_restarts_when_a_stage_swaps_in_a_validation_set_with_the_same_ids(tmp_path):
    """The staged toy run resumes one run directory on a new validation file whose ids equal the old one's: its
    first evaluation must become the new best even when the old stage's (easier) value was higher."""
    import dataclasses
    import json
    from types import SimpleNamespace

    from latentwire import checkpoint as CK
    from latentwire.train import keep_best

    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:5]
    harder = [dataclasses.replace(ex, context=ex.context + " More.") for ex in examples]
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step_{step}").mkdir(parents=True)
        (root / f"step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))

    run = SimpleNamespace(out=tmp_path, is_main=True)
    keep_best(run, 1, root / "step_1", {"value": 92.0, "metric": "latent_first_tok_top1_mean"}, examples)
    keep_best(run, 2, root / "step_2", {"value": 20.0, "metric": "latent_first_tok_top1_mean"}, harder)
    assert CK.read_best(root)["checkpoint"] == "step_2"
    keep_best(run, 3, root / "step_3", {"value": 15.0, "metric": "latent_first_tok_top1_mean"}, harder)
    assert CK.read_best(root)["checkpoint"] == "step_2"
