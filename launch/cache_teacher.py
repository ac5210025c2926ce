"""Run a large teacher once over the training data and cache its top-k log-probs at the K answer positions.

    python launch/cache_teacher.py --config configs/tiny.json --teacher PATH --out DIR [--top_k 64] \
        [--receiver NAME] [--batch_size 8] [--set key=value ...]
    deepspeed --num_gpus 8 launch/cache_teacher.py --config C --teacher PATH --out DIR \
        [--deepspeed ds_configs/zero3.json]
    torchrun --nproc_per_node 8 launch/cache_teacher.py --config C --teacher PATH --out DIR

The teacher reads each training example (`data.load_splits(cfg.data)[0]`) exactly as the receiver's text teacher
does (the receiver's tokenizer and prefix contract; `--receiver` defaults to the receiver whose tokenizer the
teacher shares). Rank r of W takes examples i with i % W == r and writes DIR/shard_<r>.safetensors: per example id,
`<id>.ids` (K, top_k) int64 and `<id>.logprobs` (K, top_k) fp32 of log_softmax(z / tau) with
K = losses.k_tokens and tau = losses.kd_temperature, `<id>.valid` (supervised rows) and `<id>.text_sha256`.
Rank 0 writes DIR/manifest.json last, after every shard is complete. With a ZeRO-3 `--deepspeed` config the
teacher is partitioned over the ranks (every rank then runs the same number of forwards).

Train with it: --set receivers.0.teachers.0.cache=DIR (the same losses.k_tokens, kd_temperature and data
settings; the run checks the manifest and names any field that differs). In-process (one rank, no process group):
`build_cache(cfg, teacher, out, top_k=...)`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentwire import config as config_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training config (configs/*.json)")
    parser.add_argument("--teacher", required=True, help="HF model dir or hub id of the teacher")
    parser.add_argument("--out", required=True, help="cache directory (shards + manifest.json)")
    parser.add_argument("--top_k", type=int, default=64, help="token ids kept per answer position")
    parser.add_argument("--receiver", default=None, help="receiver name (default: the one sharing the tokenizer)")
    parser.add_argument("--batch_size", type=int, default=8, help="examples per teacher forward")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON; ZeRO-3 partitions the teacher")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def pick_receiver(cfg: config_lib.Config, teacher_path: str, teacher_tokenizer, name: str | None):
    """-> (ReceiverConfig, its tokenizer). The named receiver must share the teacher's tokenizer; without a name,
    the only receiver that does (or the one listing this teacher, when several do)."""
    from latentwire.receivers import load_tokenizer, resolve_model_path, tokenizer_fingerprint
    from latentwire.teachers import TeacherError, check_same_tokenizer, same_model_path

    names = [r.name for r in cfg.receivers]
    if name is not None:
        if name not in names:
            raise config_lib.ConfigError(f"--receiver {name!r} is not a receiver of the config ({', '.join(names)})")
        rcfg = cfg.receivers[names.index(name)]
        tokenizer = load_tokenizer(resolve_model_path(rcfg.path))
        check_same_tokenizer(rcfg.name, rcfg.path, tokenizer, teacher_path, teacher_tokenizer)
        return rcfg, tokenizer
    wanted = tokenizer_fingerprint(teacher_tokenizer)
    matches = []
    for rcfg in cfg.receivers:
        tokenizer = load_tokenizer(resolve_model_path(rcfg.path))
        if tokenizer_fingerprint(tokenizer) == wanted:
            matches.append((rcfg, tokenizer))
    if not matches:
        raise TeacherError(f"teacher {teacher_path!r} shares the tokenizer of no receiver "
                           f"({', '.join(f'{r.name} ({r.path})' for r in cfg.receivers)})")
    if len(matches) > 1:
        listing = [m for m in matches if any(same_model_path(t.path, teacher_path) for t in m[0].teachers)]
        if len(listing) != 1:
            raise TeacherError(f"receivers {[m[0].name for m in matches]} all share the tokenizer of teacher "
                               f"{teacher_path!r}; choose one with --receiver")
        matches = listing
    return matches[0]


def check_unique_ids(examples, max_prompt_bytes: int) -> None:
    """The cache is keyed by example id: one id must always mean the same prompt and answer."""
    from latentwire.data import prompt_text

    seen = {}
    for ex in examples:
        content = (prompt_text(ex, max_prompt_bytes), ex.answers[0])
        if seen.setdefault(ex.id, content) != content:
            raise ValueError(f"example id {ex.id!r} names two different training examples; the cache is keyed by "
                             "id, so ids must be unique (e.g. several NQ files number their rows alike)")


def build_cache(cfg: config_lib.Config, teacher: str, out: Path, top_k: int = 64, receiver: str | None = None,
                batch_size: int = 8, ds_path: str | None = None, rank: int = 0, world: int = 1) -> dict | None:
    """This rank's share of the cache (examples i with i % world == rank) -> out/shard_<rank>.safetensors; after a
    barrier rank 0 writes out/manifest.json and returns it (other ranks return None). Works without a process
    group when world == 1."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from latentwire import data as data_lib
    from latentwire.distributed import barrier, build_ds_config, read_ds_config, zero_stage
    from latentwire.receivers import PrefixContract, load_tokenizer, resolve_model_path
    from latentwire.teachers import (CACHE_MANIFEST, build_teacher_forward, cache_entries, cache_manifest,
                                     teacher_ds_config)

    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CACHE_MANIFEST).unlink(missing_ok=True)  # no manifest until every shard of THIS run is complete
    barrier()
    teacher_tokenizer = load_tokenizer(resolve_model_path(teacher))
    rcfg, tokenizer = pick_receiver(cfg, teacher, teacher_tokenizer, receiver)
    contract = PrefixContract(tokenizer, rcfg.anchor, rcfg.bos_policy, cfg.data.max_answer_tokens)
    vocab = int(AutoConfig.from_pretrained(resolve_model_path(rcfg.path)).vocab_size)  # receiver LM-head rows
    top_k = min(top_k, vocab)
    inference = None
    if ds_path is not None:
        hidden = int(AutoConfig.from_pretrained(resolve_model_path(teacher)).hidden_size)
        ds = build_ds_config(read_ds_config(ds_path), batch_size, 1, world, 1e-3, 0.0, 0.0, hidden,
                             torch.cuda.is_available())
        inference = teacher_ds_config(ds) if zero_stage(ds) == 3 else None
    forward, engine = build_teacher_forward(teacher, rcfg.dtype, vocab, len(tokenizer), inference,
                                            f"teacher {teacher!r}")
    run = engine if engine is not None else forward
    device = engine.device if engine is not None else next(forward.parameters()).device

    train = data_lib.load_splits(cfg.data)[0]
    check_unique_ids(train, cfg.data.max_prompt_bytes)
    mine = list(range(rank, len(train), world))
    # Under ZeRO-3 every rank must run the same forwards: ranks with fewer examples repeat a batch, unsaved.
    per_rank = math.ceil(len(train) / world) if engine is not None else len(mine)
    n_batches = math.ceil(per_rank / batch_size)
    k, tau = cfg.losses.k_tokens, cfg.losses.kd_temperature
    entries: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        examples = [train[i] for i in (chunk or mine[:batch_size] or [0])]
        batch = data_lib.collate(examples, {rcfg.name: contract}, cfg.data.max_prompt_bytes, k)
        rb = {key: v.to(device) if isinstance(v, torch.Tensor) else v
              for key, v in batch["receivers"][rcfg.name].items()}
        with torch.no_grad():
            logits = run(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], k)
        if chunk:
            entries.update(cache_entries(batch["ids"], rb, logits, top_k, tau))
        if rank == 0 and (b + 1) % max(1, n_batches // 10) == 0:
            print(f"batch {b + 1}/{n_batches} ({time.perf_counter() - started:.0f}s)", flush=True)
    shard = out / f"shard_{rank}.safetensors"
    tmp = shard.with_name(shard.name + ".tmp")
    save_file(entries, str(tmp), metadata={"rank": str(rank), "world_size": str(world)})
    os.chmod(tmp, 0o644)  # safetensors writes through a private (0600) temp file
    os.replace(tmp, shard)
    barrier()
    manifest = None
    if rank == 0:
        shards, ids = [], set()
        for r in range(world):
            name = f"shard_{r}.safetensors"
            with safe_open(str(out / name), framework="pt") as handle:
                shard_ids = {key[: -len(".valid")] for key in handle.keys() if key.endswith(".valid")}
            ids |= shard_ids
            shards.append({"file": name, "n_examples": len(shard_ids), "bytes": (out / name).stat().st_size})
        manifest = cache_manifest(cfg, rcfg.name, contract, teacher, teacher_tokenizer, vocab, top_k, len(ids),
                                  shards)
        tmp = out / (CACHE_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out / CACHE_MANIFEST)
        print(f"cached {len(ids)} examples of teacher {teacher} for receiver {rcfg.name} in {out} "
              f"({time.perf_counter() - started:.0f}s)", flush=True)
    barrier()
    return manifest


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.set)
    except config_lib.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.top_k < 1:
        print(f"--top_k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    from latentwire.distributed import init_distributed, setup_environment

    setup_environment()  # before deepspeed is imported anywhere
    rank, world = init_distributed()
    from latentwire.teachers import TeacherError

    try:
        build_cache(cfg, args.teacher, Path(args.out), args.top_k, args.receiver, args.batch_size, args.deepspeed,
                    rank, world)
    except (TeacherError, config_lib.ConfigError) as err:  # every rank reaches the same verdict
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
