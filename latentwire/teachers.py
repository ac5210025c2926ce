"""Larger frozen teachers for knowledge distillation: run live every step, or read from an offline top-k cache.

Each receiver may list teachers in its config; every teacher must share the receiver's tokenizer (same vocabulary
and special ids, compared by `tokenizer_fingerprint` before any weights load):

    "receivers": [{"name": "llama", "path": "...-8B", "teachers": [
        {"path": "...-70B", "weight": 1.0},                        # live: one no-grad forward per step
        {"path": "...-405B", "weight": 2.0, "cache": "runs/c405"}  # cached: launch/cache_teacher.py wrote it
    ]}]

A live teacher reads the receiver's text-teacher sequence `[BOS][prompt][anchor][answer][EOS]` (same tokenizer,
so the very ids `data.collate` built) and returns fp32 logits at the K answer positions, sending only those K
rows through its LM head. It runs in its own optimizer-less DeepSpeed engine under ZeRO-3 (partitioned like the
receivers, every rank running the same forwards) and as a plain replicated module otherwise. Teachers are never
submodules of the trained module: they get no optimizer state and never enter a checkpoint.

KD target mixing (`LMHeadLoss.forward`): the dense teachers (the receiver reading the full text, weight
`losses.text_teacher_weight`, and the live teachers) form ONE probability mixture p̄ = Σ_t w_t softmax(z_t / tau)
(weights normalized), scored by `kernels.kd_softmax_loss`; each cached teacher c is scored on its own by
`kernels.kd_topk_loss`; then

    KD = (W_dense * KD_dense + Σ_c w_c * KD_c) / (W_dense + Σ_c w_c),     W_dense = Σ of the dense weights.

The offline cache (written by `launch/cache_teacher.py`) holds, per training example id, the teacher's top-k token
ids (K, top_k) int64 and tempered log-probs log_softmax(z / tau) (K, top_k) fp32 at the K answer positions, the
number of those positions inside the answer (`valid`) and the sha256 of the teacher's input ids, in
`shard_<rank>.safetensors` files named by `manifest.json`. Training validates the manifest against the config and
the receiver's tokenizer (a mismatch names the field) and every looked-up example against its batch row.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

import kernels
from latentwire.config import Config, TeacherConfig
from latentwire.distributed import is_partitioned, partitioned_loading, zero_stage
from latentwire.receivers import (Receiver, load_causal_lm, load_tokenizer, resolve_model_path,
                                  tokenizer_fingerprint)

CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = 1


class TeacherError(ValueError):
    """A teacher or its cache does not fit the receiver it teaches; the message names both sides."""


# ----------------------------------------------------------------------------------------------------------------
# tokenizer check


def describe_tokenizer_difference(a, b) -> str:
    """Human-readable differences between two tokenizers (vocabulary size, changed ids, special ids)."""
    va, vb = a.get_vocab(), b.get_vocab()
    diffs = []
    if len(va) != len(vb):
        diffs.append(f"vocabulary size {len(va)} vs {len(vb)}")
    changed = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
    if changed:
        shown = ", ".join(f"{t!r}: {va.get(t)} vs {vb.get(t)}" for t in changed[:3])
        diffs.append(f"{len(changed)} tokens with different ids (e.g. {shown})")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(a, key) != getattr(b, key):
            diffs.append(f"{key} {getattr(a, key)} vs {getattr(b, key)}")
    return "; ".join(diffs) or "fingerprints differ"


def check_same_tokenizer(receiver_name: str, receiver_path: str, receiver_tokenizer, teacher_path: str,
                         teacher_tokenizer) -> None:
    """Hard error unless the teacher encodes exactly as the receiver (vocabulary, ids and special ids)."""
    if tokenizer_fingerprint(teacher_tokenizer) == tokenizer_fingerprint(receiver_tokenizer):
        return
    raise TeacherError(
        f"teacher {teacher_path!r} does not share the tokenizer of receiver {receiver_name!r} ({receiver_path!r}): "
        f"{describe_tokenizer_difference(receiver_tokenizer, teacher_tokenizer)} (receiver vs teacher); a teacher "
        "must use its receiver's tokenizer")


# ----------------------------------------------------------------------------------------------------------------
# live teachers


def _rows(param: torch.Tensor) -> int:
    return int(param.ds_shape[0] if is_partitioned(param) else param.shape[0])


class TeacherLogits(nn.Module):
    """The teacher's LM head applied in fp32 to K rows per example, resized to the receiver's vocabulary.

    The head stays owned by the teacher model (not a child here); under ZeRO-3 it is registered as an external
    parameter, so DeepSpeed gathers it for this module's forward only (as `LMHeadLoss` does for the receiver).
    """

    def __init__(self, head: nn.Module, vocab: int, n_tokens: int, where: str):
        super().__init__()
        object.__setattr__(self, "_head", head)
        self.vocab = vocab
        rows = _rows(head.weight)
        if rows < n_tokens:
            raise TeacherError(f"{where}: the teacher's LM head has {rows} rows, fewer than the {n_tokens} tokens of "
                               "the shared tokenizer")
        self.take = min(rows, vocab)  # teacher rows past the receiver's vocabulary are padding: dropped
        if is_partitioned(head.weight):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, head.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, K, H_teacher) -> logits (B, K, V_receiver) fp32; receiver rows the teacher lacks get -inf."""
        weight = self._head.weight[: self.take]
        b, k, h = hidden.shape  # chunked over the vocabulary: never an fp32 copy of a bf16 head
        logits = kernels.lm_head_logits(hidden.reshape(b * k, h), weight).view(b, k, self.take)
        if self.take < self.vocab:  # padding rows of the receiver's head: zero teacher probability
            logits = nn.functional.pad(logits, (0, self.vocab - self.take), value=float("-inf"))
        return logits


class TeacherForward(nn.Module):
    """A frozen causal LM over the text-teacher sequence -> fp32 logits (B, K, V) at the K answer positions.

    The module a ZeRO-3 inference engine wraps: the whole teacher pass is one call of this module, so DeepSpeed's
    start/end-of-forward bookkeeping sees it as one forward.
    """

    def __init__(self, model: nn.Module, vocab: int, n_tokens: int, where: str):
        super().__init__()
        self.model = model
        self.logits = TeacherLogits(model.get_output_embeddings(), vocab, n_tokens, where)
        model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # no dropout in a teacher, whatever wraps it

    @torch.no_grad()
    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, answer_start: torch.Tensor,
                k: int) -> torch.Tensor:
        """text_ids/text_mask (B, T) = [BOS][prompt][anchor][answer][EOS] right-padded, answer_start (B,).

        Same positions as `Receiver.text_pass`: row b, slot j reads position answer_start[b] - 1 + j (clamped)."""
        hidden = self.model.get_decoder()(input_ids=text_ids[:, :-1], attention_mask=text_mask[:, :-1],
                                          use_cache=False).last_hidden_state
        positions = (answer_start.unsqueeze(1) - 1 + torch.arange(k, device=hidden.device)).clamp(
            max=hidden.shape[1] - 1)
        at_k = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.logits(at_k)


class LiveTeacher:
    """A teacher run every step; `logits(rb, k)` -> (B, K, V) fp32 for one receiver's batch entry."""

    kind = "live"

    def __init__(self, path: str, weight: float, forward: TeacherForward, engine=None):
        self.path = path
        self.weight = float(weight)
        self.forward = forward
        self.engine = engine  # the optimizer-less ZeRO-3 engine, or None when replicated

    @torch.no_grad()
    def logits(self, rb: dict, k: int) -> torch.Tensor:
        """rb: one receiver's batch entry (`data.collate`) -> (B, K, V) fp32 teacher logits, no grad."""
        run = self.engine if self.engine is not None else self.forward
        return run(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], k)

    def param_bytes(self) -> tuple[int, int]:
        """(total bytes of the teacher's parameters, bytes resident on this rank: its partition under ZeRO-3)."""
        return param_bytes(self.forward)


def param_bytes(module: nn.Module) -> tuple[int, int]:
    """(total parameter bytes of `module`, bytes resident on this rank: the partition under ZeRO-3)."""
    total = resident = 0
    for p in module.parameters():
        size = p.element_size()
        total += (p.ds_numel if is_partitioned(p) else p.numel()) * size
        resident += (p.ds_tensor.numel() if is_partitioned(p) else p.numel()) * size
    return total, resident


def teacher_ds_config(ds_config: dict) -> dict:
    """ZeRO-3 inference config for a teacher engine: the training config's partitioning and batch layout,
    no optimizer, scheduler, gradient clipping or optimizer offload."""
    zero = copy.deepcopy(ds_config.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    zero["stage"] = 3
    out = {key: ds_config[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                           "train_batch_size") if key in ds_config}
    out["zero_optimization"] = zero
    for precision in ("bf16", "fp16"):
        if precision in ds_config:
            out[precision] = copy.deepcopy(ds_config[precision])
    out["steps_per_print"] = ds_config.get("steps_per_print", 1000000)
    return out


def build_teacher_forward(path: str, dtype: str, vocab: int, n_tokens: int, inference_ds: dict | None,
                          where: str) -> tuple[TeacherForward, object]:
    """Load a teacher -> (TeacherForward, engine). With `inference_ds` (a `teacher_ds_config`) the weights are
    ZeRO-3-partitioned as they load and an optimizer-less engine wraps the module; otherwise engine is None and
    the module is replicated on this rank's device."""
    with partitioned_loading(inference_ds, dtype):  # partitions stay in `dtype` (zero.Init would pick fp32)
        try:
            model = load_causal_lm(resolve_model_path(path), dtype)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{where}: {err}") from None
    forward = TeacherForward(model, vocab, n_tokens, where)
    engine = None
    if inference_ds is None:
        if torch.cuda.is_available():
            forward.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=forward, config=inference_ds)
        engine.eval()
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        total, resident = param_bytes(forward)
        how = "ZeRO-3 inference engine" if engine is not None else "replicated"
        print(f"teacher {path} ({where}): {how}, {resident} of {total} parameter bytes resident on rank 0",
              flush=True)
    return forward, engine


def build_live_teacher(receiver: Receiver, teacher: TeacherConfig, ds_config: dict, where: str) -> LiveTeacher:
    """Check the tokenizer first (before any weights load), then load the teacher replicated, or partitioned in
    its own ZeRO-3 inference engine when the training run is ZeRO-3. It loads in its receiver's dtype."""
    tokenizer = load_tokenizer(resolve_model_path(teacher.path))
    check_same_tokenizer(receiver.cfg.name, receiver.cfg.path, receiver.tokenizer, teacher.path, tokenizer)
    vocab = _rows(receiver.model.get_output_embeddings().weight)
    inference = teacher_ds_config(ds_config) if zero_stage(ds_config) == 3 else None
    forward, engine = build_teacher_forward(teacher.path, receiver.cfg.dtype, vocab, len(tokenizer), inference,
                                            where)
    return LiveTeacher(teacher.path, teacher.weight, forward, engine)


# ----------------------------------------------------------------------------------------------------------------
# the offline cache


def same_model_path(a: str, b: str) -> bool:
    """Equal strings, or two spellings of the same local directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def sequence_digest(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sha256 (32,) uint8 of one row's unpadded ids: ties a cached row to the exact teacher input."""
    kept = ids[mask.bool()].to(torch.int64).cpu().contiguous().numpy().tobytes()
    return torch.tensor(list(hashlib.sha256(kept).digest()), dtype=torch.uint8)


def tempered_topk(logits: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V) -> top-k ids (..., k) int64 and their log_softmax(logits / tau) (..., k) fp32."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logprobs.topk(min(top_k, logits.shape[-1]), dim=-1)
    return ids.to(torch.int64), values.float()


def answer_rows(rb: dict, k: int) -> torch.Tensor:
    """(B,) number of the K positions that hold a real answer token or EOS, read from the text sequence itself
    (the curriculum may mask `targets` further; the cache keeps every answer row)."""
    answer_len = rb["text_mask"].sum(1) - rb["text_answer_start"].to(rb["text_mask"].device)
    return answer_len.clamp(min=0, max=k).to(torch.int64)


def cache_entries(example_ids: list[str], rb: dict, logits: torch.Tensor, top_k: int,
                  temperature: float) -> dict[str, torch.Tensor]:
    """The safetensors entries of one batch: f"{id}.ids", ".logprobs", ".valid" (1,), ".text_sha256" (32,)."""
    ids, logprobs = tempered_topk(logits, top_k, temperature)
    valid = answer_rows(rb, logits.shape[1])
    out = {}
    for b, ex_id in enumerate(example_ids):
        out[f"{ex_id}.ids"] = ids[b].cpu().clone()  # own storage: safetensors refuses shared tensors
        out[f"{ex_id}.logprobs"] = logprobs[b].cpu().clone()
        out[f"{ex_id}.valid"] = valid[b:b + 1].cpu().to(torch.int64).clone()
        out[f"{ex_id}.text_sha256"] = sequence_digest(rb["text_ids"][b], rb["text_mask"][b])
    return out


def cache_manifest(cfg: Config, receiver_name: str, contract, teacher_path: str, teacher_tokenizer, vocab: int,
                   top_k: int, n_examples: int, shards: list[dict]) -> dict:
    """Everything a training run checks before it trusts the cache (see `expected_manifest`)."""
    return {"format": CACHE_FORMAT, "teacher": teacher_path,
            "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer), "receiver": receiver_name,
            **expected_manifest(cfg, contract, vocab), "top_k": int(top_k), "n_examples": int(n_examples),
            "shards": shards,
            "data": {"train_files": list(cfg.data.train_files), "format": cfg.data.format, "seed": cfg.data.seed,
                     "eval_files": list(cfg.data.eval_files), "eval_fraction": cfg.data.eval_fraction,
                     "val_files": list(cfg.data.val_files), "val_fraction": cfg.data.val_fraction,
                     "max_train_examples": cfg.data.max_train_examples}}


def expected_manifest(cfg: Config, contract, vocab: int) -> dict:
    """Manifest fields that must equal the training run's: they decide the teacher's inputs and targets."""
    return {"tokenizer": tokenizer_fingerprint(contract.tokenizer),
            "contract": {"anchor": contract.anchor, "text_bos": contract.text_bos, "eos_id": contract.eos_id},
            "k_tokens": int(cfg.losses.k_tokens), "temperature": float(cfg.losses.kd_temperature),
            "vocab_size": int(vocab), "max_prompt_bytes": int(cfg.data.max_prompt_bytes),
            "max_answer_tokens": int(cfg.data.max_answer_tokens)}


class CachedTeacher:
    """A teacher read from an offline cache; `lookup(example_ids, rb)` -> top-k ids and log-probs (B, K, k)."""

    kind = "cached"

    def __init__(self, cache_dir: str, weight: float, receiver: Receiver, cfg: Config, teacher_path: str = ""):
        from safetensors import safe_open

        self.path = cache_dir
        self.weight = float(weight)
        root = Path(cache_dir)
        where = f"teacher cache {cache_dir!r} (receiver {receiver.cfg.name!r})"
        if not (root / CACHE_MANIFEST).is_file():
            raise TeacherError(f"{where}: no {CACHE_MANIFEST}; write it with launch/cache_teacher.py (an "
                               "interrupted run leaves none)")
        self.manifest = json.loads((root / CACHE_MANIFEST).read_text())
        vocab = _rows(receiver.model.get_output_embeddings().weight)
        expected = {"format": CACHE_FORMAT, **expected_manifest(cfg, receiver.contract, vocab)}
        if teacher_path and not same_model_path(teacher_path, self.manifest.get("teacher", "")):
            expected["teacher"] = teacher_path
        for key, want in expected.items():
            found = self.manifest.get(key)
            if found != want:
                raise TeacherError(f"{where}: manifest field {key!r} is {found!r} but this run expects {want!r}; "
                                   "rebuild the cache with launch/cache_teacher.py")
        if self.manifest.get("teacher_tokenizer") != expected["tokenizer"]:
            raise TeacherError(f"{where}: the cached teacher {self.manifest.get('teacher')!r} does not share the "
                               f"tokenizer of receiver {receiver.cfg.name!r} ({receiver.cfg.path!r})")
        self.top_k = int(self.manifest["top_k"])
        self._files = {}
        self._where: dict[str, str] = {}  # example id -> shard file
        for shard in self.manifest["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise TeacherError(f"{where}: shard {shard['file']} named by the manifest is missing")
            handle = safe_open(str(path), framework="pt")
            self._files[shard["file"]] = handle
            for key in handle.keys():
                if key.endswith(".valid"):
                    self._where[key[: -len(".valid")]] = shard["file"]

    def __len__(self) -> int:
        return len(self._where)

    def lookup(self, example_ids: list[str], rb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """-> topk_ids (B, K, k) int64 and topk_logprobs (B, K, k) fp32 on the batch's device.

        Raises naming the example when it is missing, or when its cached teacher input or number of supervised
        tokens differs from this batch row (data or tokenization changed since the cache was written)."""
        ids, logprobs = [], []
        text_ids, text_mask = rb["text_ids"].cpu(), rb["text_mask"].cpu()
        rows = answer_rows({"text_mask": text_mask, "text_answer_start": rb["text_answer_start"].cpu()},
                           rb["targets"].shape[1])
        for b, ex_id in enumerate(example_ids):
            shard = self._where.get(ex_id)
            if shard is None:
                raise TeacherError(f"teacher cache {self.path!r}: example id {ex_id!r} is not in the cache "
                                   f"({len(self)} examples); rebuild it over this run's training data")
            handle = self._files[shard]
            valid = int(handle.get_tensor(f"{ex_id}.valid")[0])
            if valid != int(rows[b]) or not torch.equal(
                    handle.get_tensor(f"{ex_id}.text_sha256"), sequence_digest(text_ids[b], text_mask[b])):
                raise TeacherError(f"teacher cache {self.path!r}: example id {ex_id!r} was cached from a different "
                                   "text sequence than this batch builds; rebuild the cache")
            ids.append(handle.get_tensor(f"{ex_id}.ids"))
            logprobs.append(handle.get_tensor(f"{ex_id}.logprobs"))
        device = rb["targets"].device
        return torch.stack(ids).to(device), torch.stack(logprobs).to(device)


# ----------------------------------------------------------------------------------------------------------------
# entry points for the trainer and the model


def load_teachers(cfg: Config, receivers: list[Receiver], ds_config: dict) -> dict[str, list]:
    """{receiver name: [LiveTeacher | CachedTeacher, ...]} in config order. A teacher with a `cache` is read from
    it (its `path`, when also given, must match the manifest); otherwise it runs live. Every rank calls this."""
    by_name = {r.cfg.name: r for r in receivers}
    out: dict[str, list] = {}
    for i, rcfg in enumerate(cfg.receivers):
        receiver = by_name[rcfg.name]
        out[rcfg.name] = []
        for j, teacher in enumerate(rcfg.teachers):
            where = f"receivers.{i}.teachers.{j} (receiver {rcfg.name!r})"
            if teacher.cache:
                out[rcfg.name].append(CachedTeacher(teacher.cache, teacher.weight, receiver, cfg, teacher.path))
            else:
                out[rcfg.name].append(build_live_teacher(receiver, teacher, ds_config, where))
    return out


def kd_targets(receiver: Receiver, teachers: list, rb: dict, example_ids: list[str], k: int,
               text_teacher_weight: float) -> dict:
    """Keyword arguments of `LMHeadLoss.forward` for one receiver: the text teacher's hidden states (when its
    weight is > 0), the live teachers' logits (T', B, K, V), the dense weights, and the cached teachers' top-k."""
    out: dict = {}
    dense_weights = []
    if text_teacher_weight > 0:
        out["teacher_hidden"] = receiver.text_pass(rb["text_ids"], rb["text_mask"], rb["text_answer_start"], k)
        dense_weights.append(float(text_teacher_weight))
    live = [t for t in teachers if t.kind == "live"]
    if live:
        out["extra_teacher_logits"] = torch.stack([t.logits(rb, k) for t in live])
        dense_weights += [t.weight for t in live]
    if dense_weights:
        out["teacher_weights"] = dense_weights
    cached = [t for t in teachers if t.kind == "cached"]
    if cached:
        out["cached_teachers"] = [(*t.lookup(example_ids, rb), t.weight) for t in cached]
    return out
