"""Pretrain the two toy receivers from scratch on text prompts of the toy task (`latentwire/toy.py`).

    python launch/pretrain_toy.py --out latentwire/assets/toy            # both receivers, seed 0, 2 threads
    python launch/pretrain_toy.py --out /tmp/toy --only llama --threads 1

Each receiver gets its own byte-level BPE tokenizer trained here on toy text (Llama-3 style with BOS, 512 entries;
Qwen2 style without BOS, 440 entries, so a few values split into two tokens) and a 2-layer, d=128 model of its
architecture, trained with AdamW (lr 3e-4: at 1e-3 even plain associative recall stayed at chance here) on the answer
tokens (answer + EOS) in exactly the text-teacher layout LatentWire uses:
[BOS?] "Context: ...\\nQuestion: ...\\n" "Answer:" " value" [EOS] (`PrefixContract`), plus, with equal weight, on
recall rows (`recall_batch`): the same context followed by one fact's name again, predicting its value.

Retrieval needs an induction-style phase change. Trained on the question format alone, the models stayed at chance
even with two facts (the name sits four tokens before the prediction, so two new heads are useless one without the
other); the recall rows teach the matching circuit on its own, and the answer follows a few hundred steps later.
Training also follows a curriculum over the number of facts: stage n draws (previous n)+1..n facts per example (the
first stage exactly n: with a single fact, copying the only value would pass without any matching) and moves on once
greedy accuracy on held-out people with exactly n facts reaches `--advance_at`; the last stage (8 facts) stops at
`--final_at` or `--max_steps`. Accuracy is teacher-forced all-tokens-correct over answer + EOS, which is exactly
greedy-decoding exact match. (`--all_questions` and `--lm_weight` are further training signals, off by default.)

Deterministic: data come from `random.Random(seed, step)`, the init from `torch.manual_seed(seed)`, and torch runs
with deterministic algorithms and a fixed thread count; the same command with the same torch build and thread
count rewrites the same safetensors bytes. Each model dir gets `toy_receiver.json` (recipe, seed, command,
curriculum log, held-out accuracy, weight sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentwire import toy  # noqa: E402
from latentwire.data import PROMPT_TEMPLATE  # noqa: E402
from latentwire.receivers import PrefixContract  # noqa: E402
from latentwire.tiny import LLAMA_STYLE, QWEN2_STYLE, save_tokenizer, train_byte_bpe  # noqa: E402

ANCHOR = "Answer:"
ARCHS = {
    "llama": {"style": LLAMA_STYLE, "vocab_size": 512, "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2,
              "intermediate": 384, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
    "qwen2": {"style": QWEN2_STYLE, "vocab_size": 440, "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2,
              "intermediate": 384, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}
TOKENIZER_TEXTS = 4000  # toy prompts the tokenizers are trained on (train people only)


def tokenizer_corpus(seed: int) -> list[str]:
    train_people, _ = toy.people_split()
    examples = toy.make_split(TOKENIZER_TEXTS, train_people, list(range(1, toy.MAX_FACTS + 1)), seed)
    return [PROMPT_TEMPLATE.format(context=e.context, question=e.question) + f"{ANCHOR} {e.answer}" for e in examples]


def build_model(kind: str, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    a = ARCHS[kind]
    common = dict(vocab_size=len(tokenizer), hidden_size=a["hidden"], intermediate_size=a["intermediate"],
                  num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
                  max_position_embeddings=512, rms_norm_eps=a["rms_norm_eps"], tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": a["rope_theta"]},
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    if kind == "llama":
        config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, **common)
    else:  # as in Qwen2.5: config names <|endoftext|> as BOS though the tokenizer adds none
        config = Qwen2Config(bos_token_id=tokenizer.eos_token_id, use_sliding_window=False, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def encode_batch(contract: PrefixContract, examples: list[toy.ToyExample], rng: random.Random | None = None):
    """-> ids (B, L), mask (B, L), labels (B, L) with -100 everywhere except answer tokens and EOS.

    Each row starts with the exact text-teacher sequence [BOS?][prompt][anchor][answer][EOS]. With `rng`
    (training), the row goes on with every other fact of the context asked in turn, in random order,
    "Question: ...\n" [anchor][answer][EOS] each: n supervised answers per context instead of one (as in
    multi-query associative recall), the same circuit every time.
    """
    rows, label_rows = [], []
    for ex in examples:
        prefix = contract.text_prefix_ids(PROMPT_TEMPLATE.format(context=ex.context, question=ex.question))
        answer = contract.answer_ids(ex.answer)
        row, labels = prefix + answer, [-100] * len(prefix) + answer
        if rng is not None:
            others = [f for f in toy.facts_in(ex.context) if f[2] != ex.answer]
            rng.shuffle(others)
            for first, last, value in others:
                asked = contract.encode("Question: " + toy.QUESTION.format(first=first, last=last) + "\n")
                asked += contract.anchor_ids
                more = contract.answer_ids(value)
                row, labels = row + asked + more, labels + [-100] * len(asked) + more
        rows.append(row)
        label_rows.append(labels)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), contract.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def recall_batch(contract: PrefixContract, examples: list[toy.ToyExample], rng: random.Random):
    """Recall rows: [BOS?] "Context: ...\\n" then one fact's name again -> (ids, mask, last position, its value).

    This is the plain associative-recall task (the key right before the prediction), which a 2-layer model
    learns quickly with a previous-token head and a matching head. The question format puts four tokens
    between the name and the prediction ("... Lark have?\\nAnswer:") and, trained alone, stays at chance: the
    matching head is only useful once a head brings the name to the anchor and vice versa. Recall rows train
    the matching head on their own; the answer then needs only the extra hop.
    """
    rows, targets = [], []
    for ex in examples:
        first, last, value = rng.choice(toy.facts_in(ex.context))
        context = contract.text_prefix_ids(f"Context: {ex.context}\n")[: -len(contract.anchor_ids)]
        rows.append(context + contract.encode(f" {first} {last}"))
        targets.append(contract.encode(f" {value}")[0])  # first token of the value
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), contract.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, torch.tensor([len(r) - 1 for r in rows]), torch.tensor(targets)


def recall_loss(model, ids, mask, last, targets):
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits[torch.arange(len(targets)), last].float(), targets)


def answer_loss_and_hits(model, ids, mask, labels, lm_weight: float = 0.0):
    """Mean CE over answer+EOS tokens (+ lm_weight x mean CE over the prompt tokens), and per example whether
    every answer token is the argmax (= greedy EM)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=-100)
    valid = targets != -100
    if lm_weight > 0:
        prompt = (mask[:, 1:].bool() & ~valid).reshape(-1)
        lm = torch.nn.functional.cross_entropy(flat[prompt], ids[:, 1:].reshape(-1)[prompt])
        loss = loss + lm_weight * lm
    correct = (logits.argmax(-1) == targets) | ~valid
    return loss, correct.all(dim=1)


@torch.no_grad()
def held_out_accuracy(model, contract, n_facts: int, n: int, seed: int, batch: int = 128) -> float:
    _, held_people = toy.people_split()
    examples = toy.make_split(n, held_people, [n_facts], seed)
    model.eval()
    hits = []
    for i in range(0, n, batch):
        _, ok = answer_loss_and_hits(model, *encode_batch(contract, examples[i:i + batch]))
        hits += ok.tolist()
    model.train()
    return 100.0 * sum(hits) / len(hits)


def pretrain(kind: str, out: Path, args) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    style = ARCHS[kind]["style"]
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save_tokenizer(train_byte_bpe(tokenizer_corpus(args.seed), ARCHS[kind]["vocab_size"], style), work, style)
    tokenizer = AutoTokenizer.from_pretrained(work)  # train on exactly what a reader will load
    contract = PrefixContract(tokenizer, ANCHOR, "auto", max_answer_tokens=8)
    model = build_model(kind, tokenizer, args.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    train_people, _ = toy.people_split()
    stages = [int(x) for x in args.stages.split(",")]
    stage, log, acc = 0, [], 0.0
    step = 0
    for step in range(1, args.max_steps + 1):
        lr = args.lr * min(1.0, step / args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        rng = random.Random(f"{args.seed}-{step}")
        n_max = stages[stage]
        n_min = stages[stage - 1] + 1 if stage else n_max
        examples = [toy.make_example(rng, train_people, rng.randint(n_min, n_max)) for _ in range(args.batch)]
        batch = encode_batch(contract, examples, rng if args.all_questions else None)
        loss, _ = answer_loss_and_hits(model, *batch, lm_weight=args.lm_weight)
        if args.recall_weight > 0:
            loss = loss + args.recall_weight * recall_loss(model, *recall_batch(contract, examples, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every:
            continue
        acc = held_out_accuracy(model, contract, n_max, args.eval_examples, args.seed + 17)
        last = stage == len(stages) - 1
        log.append({"step": step, "facts": n_max, "loss": round(float(loss.detach()), 4), "held_out_acc": acc,
                    "elapsed_s": round(time.perf_counter() - started, 1)})
        print(f"[{kind}] step {step} facts {n_max} loss {float(loss):.4f} held-out acc {acc:.1f}%", flush=True)
        if not last and acc >= args.advance_at:
            stage += 1
        elif last and acc >= args.final_at:
            break
    final = held_out_accuracy(model, contract, toy.MAX_FACTS, args.final_examples, args.seed + 29)
    model.save_pretrained(work)
    weights = work / "model.safetensors"
    info = {
        "receiver": kind, "architecture": {k: v for k, v in ARCHS[kind].items() if k != "style"},
        "tokenizer_vocab": len(tokenizer), "params": sum(p.numel() for p in model.parameters()),
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "command": "python launch/pretrain_toy.py " + " ".join(args.argv),
        "recipe": {k: getattr(args, k) for k in ("lr", "batch", "warmup", "all_questions", "recall_weight", "lm_weight",
                                                 "stages", "advance_at", "final_at", "max_steps", "eval_every",
                                                 "eval_examples")},
        "steps": step, "curriculum": log, "reached_final_stage": stage == len(stages) - 1,
        "held_out_em_8_facts": final, "held_out_examples": args.final_examples,
        "train_seconds": round(time.perf_counter() - started, 1),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (work / "toy_receiver.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    print(f"[{kind}] done: {step} steps, held-out EM (8 facts) {final:.1f}%, {info['train_seconds']:.0f} s -> {out}")
    return info


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="latentwire/assets/toy", help="writes OUT/llama and OUT/qwen2")
    p.add_argument("--only", choices=sorted(ARCHS), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of the bit-for-bit recipe)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--all_questions", type=int, default=0, help="1: ask every fact of a training context")
    p.add_argument("--recall_weight", type=float, default=1.0, help="weight of the recall rows (see recall_batch)")
    p.add_argument("--lm_weight", type=float, default=0.0, help="weight of the CE on prompt tokens (0 = answer only)")
    p.add_argument("--stages", default="2,4,8", help="curriculum: max facts per stage")
    p.add_argument("--advance_at", type=float, default=97.0, help="held-out accuracy that ends a stage")
    p.add_argument("--final_at", type=float, default=99.0, help="held-out accuracy that ends the last stage")
    p.add_argument("--max_steps", type=int, default=12000)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--eval_examples", type=int, default=512)
    p.add_argument("--final_examples", type=int, default=2048)
    args = p.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    summary = {}
    for kind in [args.only] if args.only else sorted(ARCHS):
        summary[kind] = pretrain(kind, out / kind, args)["held_out_em_8_facts"]
    print(json.dumps(summary))
    return 0 if all(v >= 90.0 for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
