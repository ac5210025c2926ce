"""Cut one official SQuAD v1.1 file into train / test files by article, for configs/small_real.json.

    python launch/squad_articles.py ../shared/data/squad/dev-v1.1.json --out runs/squad_dev \
        [--test_articles 8] [--test_per_article 13]

Writes into OUT:
    train.json     the first N - test_articles articles, whole, in the official layout (validation is cut from
                   them by article: data.val_fraction)
    test.json      a fixed set of `test_per_article` questions from each of the LAST `test_articles` articles
                   (evenly spaced through each article, so they cover its paragraphs), in round-robin article
                   order, so any prefix of the file (eval.max_examples) is spread over the articles too; one
                   `data` entry per question, titled by its article
    manifest.json  the source file's sha256, the articles of each side, and each split's {n, sha256 of the sorted
                   question ids} exactly as run_info.json records them (latentwire.data.split_digest)

The cut is a pure function of the source file and the two numbers (no random state); rerunning it rewrites the
same bytes. Both files read back with `latentwire.data.read_file` and are disjoint by article.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pick_evenly(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n): the middle of each of k equal stretches (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    return [int((j + 0.5) * n / k) for j in range(k)]


def cut(source: dict, test_articles: int, test_per_article: int) -> tuple[dict, dict]:
    """(train, test) SQuAD-layout dicts from the official dict `source` (see the module docstring)."""
    articles = source["data"]
    if not 0 < test_articles < len(articles):
        raise ValueError(f"--test_articles must be in [1, {len(articles) - 1}], got {test_articles}")
    train = {"version": source.get("version", ""), "data": articles[:-test_articles]}
    picked = []  # per test article: [(title, context, qa), ...]
    for article in articles[-test_articles:]:
        flat = [(article["title"], para["context"], qa) for para in article["paragraphs"] for qa in para["qas"]]
        picked.append([flat[i] for i in pick_evenly(len(flat), test_per_article)])
    rows = [group[i] for i in range(max(map(len, picked))) for group in picked if i < len(group)]
    entries = [{"title": title, "paragraphs": [{"context": context, "qas": [qa]}]} for title, context, qa in rows]
    test = {"version": source.get("version", ""), "data": entries}
    return train, test


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="official SQuAD v1.1 JSON (e.g. ../shared/data/squad/dev-v1.1.json)")
    parser.add_argument("--out", required=True, help="directory for train.json, test.json, manifest.json")
    parser.add_argument("--test_articles", type=int, default=8, help="the last N articles give the test questions")
    parser.add_argument("--test_per_article", type=int, default=13, help="test questions taken from each of them")
    args = parser.parse_args(argv)
    from latentwire.data import check_disjoint, read_file, split_digest, Splits

    source_path = Path(args.source)
    raw = source_path.read_bytes()
    train, test = cut(json.loads(raw), args.test_articles, args.test_per_article)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.json", train)
    _write(out / "test.json", test)
    train_ex, test_ex = read_file(str(out / "train.json")), read_file(str(out / "test.json"))
    check_disjoint(Splits(train_ex, [], test_ex))
    manifest = {"source": str(source_path), "source_sha256": hashlib.sha256(raw).hexdigest(),
                "test_articles": args.test_articles, "test_per_article": args.test_per_article,
                "train": {"articles": [a["title"] for a in train["data"]], **split_digest(train_ex)},
                "test": {"articles": list(dict.fromkeys(a["title"] for a in test["data"])), **split_digest(test_ex)}}
    _write(out / "manifest.json", manifest)
    print(f"{out}: train {manifest['train']['n']} questions from {len(manifest['train']['articles'])} articles; "
          f"test {manifest['test']['n']} questions from {manifest['test']['articles']} "
          f"(ids sha256 {manifest['test']['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
