"""Tiny Llama- and Qwen2-architecture checkpoints, built on disk from nothing.

LatentWire's real receivers are Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct. To run the whole pipeline on a CPU
in seconds (tests, the tiny preset, CI) we need models that go through exactly the same code path --
`AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` -- but with a few hundred
thousand parameters instead of eight billion. This module builds them:

- `tiny-llama`: `LlamaConfig` (GQA, rope_theta 500000, untied LM head) with a byte-level BPE tokenizer trained
  here, Llama-3 style: `<|begin_of_text|>` is prepended on every encode, `<|end_of_text|>` is EOS, padding uses
  the reserved `<|finetune_right_pad_id|>`.
- `tiny-qwen2`: `Qwen2Config` (GQA, q/k/v biases, rope_theta 1e6, untied LM head) with its own, differently sized
  byte-level BPE tokenizer, Qwen2 style: no BOS at all, `<|endoftext|>` is both EOS and PAD.

The two vocabularies differ on purpose, so code that assumes a shared vocabulary fails on the tiny pair exactly as
it would on the real pair. Weights are random (seeded) and saved as float32 safetensors. Tokenizers are trained on
the text of the bundled SQuAD v1.1 sample (`assets/squad_sample.json`, see `assets/README.md`); the
`tokenizers` BPE trainer is deterministic for a fixed input order, so a rebuild with the same seed gives the
same bytes.

Larger "teachers" that share a receiver's tokenizer (same ids, same specials) come from `build_tiny_teacher`.

Run:
    python -m latentwire.tiny --out DIR [--seed N] [--overwrite]

A finished model directory holds a `tiny_spec.json` stamp, written last; `build_tiny_receivers` skips a directory
whose stamp matches the requested spec and rebuilds one whose stamp is missing (a half-written build) or differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SQUAD_SAMPLE = ASSETS_DIR / "squad_sample.json"
STAMP_NAME = "tiny_spec.json"
MAX_POSITIONS = 2048
# Bump when the build recipe changes in a way the spec dicts below do not capture.
RECIPE_VERSION = 1

# Files `PreTrainedTokenizerFast.save_pretrained` may write; a teacher copies whichever of them exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Pre-tokenizer splits written after the published tokenizer.json files: Llama 3 groups digits in threes, Qwen2
# splits every digit. They matter beyond fidelity: on load, transformers 5 rebuilds a qwen2 tokenizer through
# `Qwen2Tokenizer`, which imposes its own split regex and NFC normalizer on our vocabulary, so the tokenizer we
# train has to use the same ones or the reloaded tokenizer would encode differently from the trained one.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA_STYLE = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|finetune_right_pad_id|>",
    "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "split": LLAMA3_SPLIT,
    "nfc": False,
    "tokenizer_class": "PreTrainedTokenizerFast",  # as in meta-llama/Llama-3.1-8B-Instruct
}
QWEN2_STYLE = {
    "bos": None,
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "extra": ["<|im_start|>", "<|im_end|>"],
    "split": QWEN2_SPLIT,
    "nfc": True,
    "tokenizer_class": "Qwen2Tokenizer",  # as in Qwen/Qwen2.5-7B-Instruct
}

LLAMA_SPEC = {
    "vocab_size": 1000,  # target, specials included
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 176,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}
QWEN2_SPEC = {
    "vocab_size": 1300,
    "hidden": 96,
    "layers": 2,
    "heads": 6,
    "kv_heads": 2,
    "intermediate": 224,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}


# ---------------------------------------------------------------------------------------------------------------
# Bundled text


def make_squad_sample(src, dst, first_article=0, article_step=8, n_articles=6, n_paragraphs=12):
    """Cut the bundled sample out of the official SQuAD v1.1 dev file, keeping the official JSON layout.

    Articles `first_article, first_article + article_step, ...` (`n_articles` of them), each with its first
    `n_paragraphs` paragraphs and all of their questions, written with `json.dumps` defaults like the original.
    """
    with open(src, encoding="utf-8") as f:
        squad = json.load(f)
    picked = []
    for index in range(first_article, first_article + article_step * n_articles, article_step):
        article = squad["data"][index]
        picked.append({"title": article["title"], "paragraphs": article["paragraphs"][:n_paragraphs]})
    Path(dst).write_text(json.dumps({"data": picked, "version": squad["version"]}), encoding="utf-8")


def bundled_texts(path=SQUAD_SAMPLE):
    """All text in the bundled SQuAD sample, in file order: each context, then its questions and distinct answers."""
    with open(path, encoding="utf-8") as f:
        squad = json.load(f)
    texts = []
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            for qa in paragraph["qas"]:
                texts.append(qa["question"])
                texts.extend(dict.fromkeys(a["text"] for a in qa["answers"]))
    return texts


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def train_byte_bpe(texts, vocab_size, style):
    """Train a byte-level BPE tokenizer with `vocab_size` entries in total, special tokens last.

    `style` is `LLAMA_STYLE` or `QWEN2_STYLE`. As in the real Llama 3 and Qwen2 vocabularies, the special tokens
    sit after the learned ones (their ids are the largest), and every byte has a token, so any UTF-8 string
    encodes and decodes back unchanged (for Qwen2, any NFC string: its loader normalizes to NFC).
    Returns a `transformers.PreTrainedTokenizerFast`.
    """
    special_tokens = list(dict.fromkeys(t for t in (style["bos"], style["eos"], style["pad"], *style["extra"]) if t))
    backend = Tokenizer(models.BPE())
    if style["nfc"]:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(style["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(special_tokens)

    # The ByteLevel step only fixes offsets; the template is what makes `tok(text)` start with BOS like Llama 3.
    byte_offsets = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if style["bos"] is None:
        backend.post_processor = byte_offsets
    else:
        bos = style["bos"]
        prepend_bos = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, backend.token_to_id(bos))]
        )
        backend.post_processor = processors.Sequence([byte_offsets, prepend_bos])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=style["bos"],
        eos_token=style["eos"],
        pad_token=style["pad"],
        extra_special_tokens=style["extra"],
        model_max_length=MAX_POSITIONS,
    )


def save_tokenizer(tokenizer, path, style):
    """`save_pretrained`, then name the tokenizer class the real checkpoint names, so `AutoTokenizer` loads ours
    through the same class as the real model's."""
    tokenizer.save_pretrained(path)
    config_file = Path(path) / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = style["tokenizer_class"]
    config_file.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer(src_dir, dst_dir):
    """Copy a saved tokenizer byte for byte, so a teacher and its receiver share every id."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"no tokenizer.json in {src_dir}")


# ---------------------------------------------------------------------------------------------------------------
# Models


def _save_model(config, path, seed):
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    # safetensors writes through a private temp file (mode 0600); give the weights the mode config.json got.
    config_mode = (Path(path) / "config.json").stat().st_mode & 0o777
    for weights in Path(path).glob("*.safetensors"):
        weights.chmod(config_mode)
    return sum(p.numel() for p in model.parameters())


def _prepare_tokenizer(path, texts, vocab_size, style, tokenizer_from):
    """Train (or copy) the tokenizer into `path`; return (vocab size, bos id, eos id, pad id) as reloaded."""
    if tokenizer_from is None:
        save_tokenizer(train_byte_bpe(texts, vocab_size, style), path, style)
    else:
        copy_tokenizer(tokenizer_from, path)
    tok = AutoTokenizer.from_pretrained(path)
    return len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


# Per architecture: config class, spec, tokenizer style, and what differs in the config. The Qwen2 tokenizer has no
# BOS; as in the real Qwen2.5 base config, `config.bos_token_id` still names `<|endoftext|>` (its EOS), so read the
# BOS policy from the tokenizer, not the config.
ARCHS = {
    "llama": (LlamaConfig, LLAMA_SPEC, LLAMA_STYLE, lambda bos, eos: {"bos_token_id": bos}),
    "qwen2": (Qwen2Config, QWEN2_SPEC, QWEN2_STYLE, lambda bos, eos: {"bos_token_id": eos, "use_sliding_window": False}),
}
RECEIVER_ARCH = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}


def build_tiny_model(model_type, path, texts, seed=0, hidden=None, layers=None, intermediate=None,
                     tokenizer_from=None):
    """Write a random-init model of `model_type` ("llama" | "qwen2") and its tokenizer to `path`; return its
    parameter count.

    `texts` train the tokenizer unless `tokenizer_from` names a saved tokenizer to copy (then `texts` is unused).
    `hidden`, `layers`, `intermediate` override the architecture's spec (for larger same-tokenizer teachers).
    """
    config_cls, spec, style, extra = ARCHS[model_type]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, bos_id, eos_id, pad_id = _prepare_tokenizer(path, texts, spec["vocab_size"], style, tokenizer_from)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden or spec["hidden"],
        intermediate_size=intermediate or spec["intermediate"],
        num_hidden_layers=layers or spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
        rms_norm_eps=spec["rms_norm_eps"],
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
        **extra(bos_id, eos_id),
    )
    return _save_model(config, path, seed)


# ---------------------------------------------------------------------------------------------------------------
# Stamps and the public entry points


def _spec_hash(spec):
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _is_built(path, spec):
    stamp = Path(path) / STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text())["spec_hash"] == _spec_hash(spec)
    except (ValueError, KeyError):
        return False


def _build_stamped(path, spec, build):
    """Run `build(partial_dir)` in a fresh sibling directory, swap it in at `path`, then write the stamp.

    An interrupted build leaves at most an unstamped model directory at `path`, which the next call replaces; a
    non-empty directory without a config.json is refused rather than deleted. Not safe for several processes building the same path at once: build on one rank, then barrier.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} is not empty and does not look like a tiny model build; not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        n_params = build(partial)
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    stamp = {"spec": spec, "spec_hash": _spec_hash(spec), "n_params": n_params}
    (path / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _receiver_spec(name, seed):
    arch = ARCHS[RECEIVER_ARCH[name]][1]
    sample_sha = hashlib.sha256(SQUAD_SAMPLE.read_bytes()).hexdigest()
    return {"name": name, "arch": arch, "seed": seed, "recipe": RECIPE_VERSION, "sample_sha256": sample_sha}


def build_tiny_receivers(out_dir, seed=0, overwrite=False):
    """Build `tiny-llama` and `tiny-qwen2` under `out_dir`; return {name: path}.

    A directory whose `tiny_spec.json` matches the spec (architecture, seed, recipe version, sample hash) is kept
    as is unless `overwrite`; anything else at that path is replaced.
    """
    out_dir = Path(out_dir)
    texts = None
    paths = {}
    for name, model_type in RECEIVER_ARCH.items():
        path = out_dir / name
        spec = _receiver_spec(name, seed)
        if overwrite or not _is_built(path, spec):
            if texts is None:
                texts = bundled_texts()
            _build_stamped(path, spec, lambda tmp, t=model_type: build_tiny_model(t, tmp, texts, seed))
        paths[name] = path
    return paths


def build_tiny_teacher(receiver_dir, out_dir, seed=0, scale=2, overwrite=False):
    """Build a larger teacher of the receiver's architecture that shares its tokenizer files exactly.

    Width and MLP width are multiplied by `scale` (head count and KV head count kept, so heads get wider) and the
    teacher has `scale - 1` more layers. Returns the teacher's path.
    """
    receiver_config = json.loads((Path(receiver_dir) / "config.json").read_text())
    tokenizer_sha = hashlib.sha256((Path(receiver_dir) / "tokenizer.json").read_bytes()).hexdigest()
    model_type = receiver_config["model_type"]
    sizes = {
        "hidden": receiver_config["hidden_size"] * scale,
        "layers": receiver_config["num_hidden_layers"] + scale - 1,
        "intermediate": receiver_config["intermediate_size"] * scale,
    }
    spec = {"teacher_of": receiver_config["model_type"], "tokenizer_sha256": tokenizer_sha, "seed": seed,
            "recipe": RECIPE_VERSION, **sizes}
    if overwrite or not _is_built(out_dir, spec):
        _build_stamped(out_dir, spec,
                       lambda tmp: build_tiny_model(model_type, tmp, None, seed, tokenizer_from=receiver_dir, **sizes))
    return Path(out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to build tiny-llama/ and tiny-qwen2/ in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if a matching build exists")
    args = parser.parse_args(argv)
    for name, path in build_tiny_receivers(args.out, seed=args.seed, overwrite=args.overwrite).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
