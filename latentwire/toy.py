"""A toy world where small frozen receivers are genuinely competent: synthetic extractive QA over key-value facts.

No pretrained LLM can be downloaded here and random tiny receivers answer nothing, so this module builds a task
that two ~0.5M-parameter receivers can learn from scratch on a CPU (`launch/pretrain_toy.py`) and that
LatentWire then has to carry through its latent (`launch/toy_benchmark.sh`). One example:

    Context: Ada Hart owl. Gus Vale fig. ... (n facts)
    Question: What does Gus Vale have?
    Answer: fig

- The answer is a one-word span copied from the context; values are drawn per example, without replacement, so
  the same person keeps different things in different examples: the question alone never determines the answer.
- People are (first, last) name pairs. The 16 x 16 = 256 full names are split once, deterministically, into train
  (192) and held-out people (64), and the held-out ones into validation (32) and test (32): no held-out person ever
  appears in training, and validation and test share no one (every first and last name word does, so the
  receivers' tokenizers and embeddings know the pieces). Within one context first names and last names are
  distinct, so a fact is identified by either half of the name.
- The asked fact is drawn uniformly among the n, so a reader that sees only the head of the prompt (the
  token-budget baseline) can do little better than 1/n.

Files are written in the official SQuAD v1.1 JSON layout (one article per example, `answer_start` set), so the
normal data path (`latentwire.data.read_file`) and the official metric read them unchanged:

    python -m latentwire.toy --out runs/toy/data [--n_train 20000 --n_val 256 --n_test 512 --facts 1-8 \
        --eval_facts 8 --seed 0]     # -> train.json, val.json, test.json

Everything is a pure function of the seed: the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

# Fixed widths (3-letter first names, 4-letter last names, 3-letter values) give every fact the same byte length,
# so facts sit at regular byte offsets: the byte encoder has learned absolute positions, not relative ones.
FIRST_NAMES = ("Ada", "Bea", "Cal", "Dan", "Eli", "Fay", "Gus", "Hal", "Ida", "Joe", "Kai", "Lou", "Max", "Ned", "Oli",
               "Pia")
LAST_NAMES = ("Hart", "Vale", "Moss", "Reed", "Lark", "Snow", "Pike", "Cole", "Dunn", "Frey", "Gray", "Holt", "Kerr",
              "Lowe", "Roth", "Webb")
VALUES = ("owl", "fox", "elk", "yak", "ape", "bat", "bee", "cow", "eel", "emu", "hen", "pig", "ram", "cod", "ant",
          "gnu", "fig", "oat", "nut", "egg", "jam", "tea", "ham", "bun", "yam", "pea", "rye", "cup", "mug", "pen",
          "hat", "key")
MAX_FACTS = 8
FACT = "{first} {last} {value}."  # the value right after the name: see pretrain_toy.py
QUESTION = "What does {first} {last} have?"
SPLIT_SEED = 1234  # fixed: the person split is part of the world, not of a run
EVAL_PEOPLE_FRACTION = 0.25


@dataclass(frozen=True)
class ToyExample:
    context: str
    question: str
    answer: str
    answer_start: int  # character offset of the answer inside the context
    n_facts: int


def people_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train people, held-out people): a fixed partition of all first x last name pairs.

    Every first and every last name occurs in both halves (checked), so held-out people are new combinations of
    known words, never new words.
    """
    people = [(f, s) for f in FIRST_NAMES for s in LAST_NAMES]
    random.Random(SPLIT_SEED).shuffle(people)
    n_eval = round(len(people) * EVAL_PEOPLE_FRACTION)
    held, train = sorted(people[:n_eval]), sorted(people[n_eval:])
    for side in (train, held):
        assert {f for f, _ in side} == set(FIRST_NAMES) and {s for _, s in side} == set(LAST_NAMES)
    return train, held


def people_splits() -> dict[str, list[tuple[str, str]]]:
    """{"train", "validation", "test"}: the held-out people of `people_split` cut in two halves, so validation
    (model selection, curriculum decisions) and test (the reported numbers) share no person either."""
    train, held = people_split()
    held = list(held)
    random.Random(SPLIT_SEED + 1).shuffle(held)
    half = len(held) // 2
    return {"train": train, "validation": sorted(held[:half]), "test": sorted(held[half:])}


def _pick_people(rng: random.Random, people: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n people with pairwise distinct first names and distinct last names (rejection sampling, always succeeds
    quickly for n <= 8 out of 16 x 16)."""
    while True:
        chosen = rng.sample(people, n)
        if len({f for f, _ in chosen}) == n and len({s for _, s in chosen}) == n:
            return chosen


def make_example(rng: random.Random, people: list[tuple[str, str]], n_facts: int) -> ToyExample:
    """One example with `n_facts` facts about distinct people from `people`; the asked fact is uniform."""
    if not 1 <= n_facts <= MAX_FACTS:
        raise ValueError(f"n_facts must be in [1, {MAX_FACTS}], got {n_facts}")
    chosen = _pick_people(rng, people, n_facts)
    values = rng.sample(VALUES, n_facts)
    facts = [FACT.format(first=f, last=s, value=v) for (f, s), v in zip(chosen, values)]
    asked = rng.randrange(n_facts)
    context = " ".join(facts)
    start = sum(len(x) + 1 for x in facts[:asked]) + facts[asked].rindex(values[asked])
    assert context[start:start + len(values[asked])] == values[asked]
    first, last = chosen[asked]
    return ToyExample(context, QUESTION.format(first=first, last=last), values[asked], start, n_facts)


def facts_in(context: str) -> list[tuple[str, str, str]]:
    """The (first, last, value) triples of a context, in order (inverse of the FACT template)."""
    out = []
    for fact in context.removesuffix(".").split(". "):
        first, last, value = fact.split(" ")
        out.append((first, last, value))
    return out


def parse_facts(spec: str | int) -> list[int]:
    """'8' -> [8]; '1-8' -> [1, ..., 8]; '2,4,8' -> [2, 4, 8]."""
    spec = str(spec)
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in spec.split(",")]


def make_split(n: int, people: list[tuple[str, str]], facts: list[int], seed: int) -> list[ToyExample]:
    """n examples whose number of facts is drawn uniformly from `facts`."""
    rng = random.Random(seed)
    return [make_example(rng, people, rng.choice(facts)) for _ in range(n)]


def asked_person(question: str) -> str:
    """'What does Gus Vale have?' -> 'Gus Vale': the grouping key of the splits."""
    return " ".join(question.split()[2:4])


def to_squad(examples: list[ToyExample], prefix: str) -> dict:
    """The official SQuAD v1.1 layout, one article (and one paragraph) per example; the article title is the
    person asked about, the key by which splits are kept apart."""
    data = []
    for i, ex in enumerate(examples):
        qa = {"id": f"{prefix}-{i:06d}", "question": ex.question,
              "answers": [{"answer_start": ex.answer_start, "text": ex.answer}]}
        data.append({"title": asked_person(ex.question), "paragraphs": [{"context": ex.context, "qas": [qa]}]})
    return {"data": data, "version": "1.1"}


SPLIT_FILES = {"train": "train.json", "validation": "val.json", "test": "test.json"}


def write_splits(out: str | Path, n_train: int = 20000, n_val: int = 256, n_test: int = 512, facts: str = "1-8",
                 eval_facts: str = "8", seed: int = 0) -> dict[str, Path]:
    """Write `train.json`, `val.json` and `test.json` under `out`, each from its own people and its own seed;
    return {split: path}. Validation and test have `eval_facts` facts per example."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    people = people_splits()
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    paths = {}
    for i, (name, filename) in enumerate(SPLIT_FILES.items()):
        examples = make_split(sizes[name], people[name], parse_facts(facts if name == "train" else eval_facts),
                              seed + i * 1_000_003)
        paths[name] = out / filename
        tmp = paths[name].with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_squad(examples, f"toy-{name}")) + "\n", encoding="utf-8")
        tmp.replace(paths[name])
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.json, val.json and test.json")
    parser.add_argument("--n_train", type=int, default=20000)
    parser.add_argument("--n_val", type=int, default=256)
    parser.add_argument("--n_test", type=int, default=512)
    parser.add_argument("--facts", default="1-8", help="facts per training example: N, LO-HI or a,b,c")
    parser.add_argument("--eval_facts", default="8", help="facts per validation and test example")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_splits(args.out, args.n_train, args.n_val, args.n_test, args.facts, args.eval_facts,
                                   args.seed).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
