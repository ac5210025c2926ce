"""Frozen receiver LLMs and the prefix contract they are read through.

One `PrefixContract` per receiver defines every sequence LatentWire builds, for training, scoring and generation:

    latent:       [P (M slots)] [BOS if policy says] [anchor] [answer] [EOS]
    text teacher: [BOS if the tokenizer adds one] [prompt] [anchor] [answer] [EOS]

Targets are the answer tokens and EOS, never BOS or padding. The answer is tokenized as " " + answer right after
the anchor; at construction (and for every example) we assert that this split tokenizes the first answer token
exactly as the joint string "anchor answer" does (t=0 alignment) — a hard error, not a warning.

With `chat_template` (a receiver read as a chat model, `receivers[].chat_template`), the tokenizer's own chat
template lays out the text side as a user would send it, and the anchor is what the template writes between the
user's message and the assistant's reply (Llama 3.1: `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n`):

    latent:       [P] [BOS if policy says] [assistant header] [answer] [EOS]
    text teacher: [template head (its BOS, system turn, user header)] [prompt] [assistant header] [answer] [EOS]

The answer then follows the header with no leading space, as the assistant's reply does, and EOS must be the token
that closes an assistant turn (`<|eot_id|>`, `<|im_end|>`); both are checked at construction.

`Receiver` wraps one frozen `AutoModelForCausalLM`: embedding lookup, ONE teacher-forced pass that returns hidden
states (before the LM head) at the first K answer positions, scoring, and greedy generation with a KV cache that
stops at EOS or `max_new_tokens` only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from latentwire.config import ReceiverConfig
from latentwire.distributed import gathered

ALIGNMENT_PROBES = ("Paris", "1990", "the Broncos", "Denver Broncos", "42%", "Zürich", "yes")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHAT_PROBE = "LATENTWIRE_CHAT_PROBE"  # stands for a message while we cut the chat template around it


class ContractError(ValueError):
    """The prefix contract cannot hold for this tokenizer / example."""


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and special ids: equal iff two tokenizers encode alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def render_user_turn(tokenizer, content: str) -> str:
    """One user message rendered by the tokenizer's chat template, with the assistant generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def chat_template_parts(tokenizer) -> tuple[str, str, str]:
    """(head, header, turn_end): the chat template renders a user message C as head + C + header, and the
    assistant's reply A after it as A + turn_end. Raises ContractError when the tokenizer has no template or the
    template does not write the message verbatim."""
    name = tokenizer.name_or_path
    if not getattr(tokenizer, "chat_template", None):
        raise ContractError(f"chat_template is on but tokenizer {name!r} has no chat template")
    prompt = render_user_turn(tokenizer, CHAT_PROBE)
    if prompt.count(CHAT_PROBE) != 1:
        raise ContractError(f"the chat template of {name!r} does not write the user message verbatim once")
    head, header = prompt.split(CHAT_PROBE)
    reply = "LATENTWIRE_REPLY_PROBE"
    full = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROBE},
                                          {"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(prompt + reply):
        raise ContractError(f"the chat template of {name!r} does not continue its generation prompt with the "
                            f"assistant's reply (rendered {full[len(head):]!r})")
    return head, header, full[len(prompt) + len(reply):]


class PrefixContract:
    """Token-level layout of the latent and text sequences for one receiver (see module docstring)."""

    def __init__(self, tokenizer, anchor: str, bos_policy: str = "auto", max_answer_tokens: int = 24,
                 chat_template: bool = False, chat_instruction: str = ""):
        self.tokenizer = tokenizer
        self.max_answer_tokens = max_answer_tokens
        self.chat_template = bool(chat_template)
        if chat_instruction and not self.chat_template:
            raise ContractError("a chat instruction is only read through the chat template (chat_template: true)")
        # A fixed line after the user's message (e.g. "Answer with just the answer ..."): part of the template, so
        # the text side reads it on every path and the budgets do not count it; the latent reads no message at all.
        self.chat_instruction = chat_instruction.strip()
        self.bos_id = tokenizer.bos_token_id
        if tokenizer.eos_token_id is None:
            raise ContractError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; answers must end with one")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id
        # A tokenizer may declare a BOS it never adds (SmolLM2 names <|im_start|>): only an added one is used.
        adds_bos = self.bos_id is not None and tokenizer("a")["input_ids"][:1] == [self.bos_id]
        if bos_policy == "always" and self.bos_id is None:
            raise ContractError(f"bos_policy 'always' but tokenizer {tokenizer.name_or_path!r} has no BOS token")
        self.latent_bos = {"auto": adds_bos, "always": True, "never": False}[bos_policy]
        self.text_bos = adds_bos
        self.answer_prefix = " "  # what separates the anchor from the answer
        self.chat_head_ids: list[int] = []
        if self.chat_template:
            head, anchor, turn_end = chat_template_parts(tokenizer)  # the assistant header is the anchor
            self.answer_prefix = ""  # the reply starts right after the header, as the assistant's does
            self.text_bos = False  # the template writes the BOS where the family has one
            self.chat_head_ids = self.encode(head)
            if self.encode(turn_end)[:1] != [self.eos_id]:
                raise ContractError(
                    f"the chat template of {tokenizer.name_or_path!r} closes an assistant turn with {turn_end!r} "
                    f"({self.encode(turn_end)[:1]}), not with the tokenizer's EOS {self.eos_id}: generation would "
                    "not stop where the reply ends")
        elif anchor != anchor.rstrip(" \t"):  # a trailing newline is left to the t=0 check (chat headers end so)
            fixed = anchor.rstrip(" \t")
            joint, split = self.encode(fixed + " Paris"), self.encode(anchor) + self.encode("Paris")
            raise ContractError(
                f"anchor {anchor!r} ends with a space: the answer follows as ' ' + answer, and that space belongs "
                f"to the answer's first token ({fixed!r} + ' Paris' is {joint}, {anchor!r} + 'Paris' is {split}); "
                f"drop the trailing space: anchor {fixed!r}")
        self.anchor = anchor
        self.anchor_ids = self.encode(anchor)
        if not self.anchor_ids:
            raise ContractError(f"anchor {anchor!r} encodes to no tokens")
        for probe in ALIGNMENT_PROBES:
            self.check_alignment(probe)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        """Answer tokens (after the answer prefix, capped at max_answer_tokens) followed by EOS: the targets."""
        return self.encode(self.answer_prefix + answer.strip())[: self.max_answer_tokens] + [self.eos_id]

    def check_alignment(self, answer: str) -> None:
        """Hard t=0 check: the first answer token after the anchor is the same split or joint."""
        joint = self.encode(self.anchor + self.answer_prefix + answer.strip())
        split_first = self.encode(self.answer_prefix + answer.strip())[:1]
        n = len(self.anchor_ids)
        if joint[:n] != self.anchor_ids or joint[n:n + 1] != split_first:
            raise ContractError(
                f"t=0 alignment fails for answer {answer!r} after anchor {self.anchor!r}: joint tokens {joint} vs "
                f"anchor {self.anchor_ids} + answer {split_first}; choose an anchor ending at a token boundary")

    def latent_prefix_ids(self) -> list[int]:
        """Tokens that follow the M latent slots before the answer: [BOS?] [anchor]."""
        return ([self.bos_id] if self.latent_bos else []) + self.anchor_ids

    def text_prefix_ids(self, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
        """[BOS?] [prompt (optionally cut to its first max_prompt_tokens)] [anchor]; with the chat template,
        `user_message(prompt)` rendered as one user turn and tokenized as `apply_chat_template` does."""
        if not self.chat_template:
            prompt_ids = self.encode(prompt)
            if max_prompt_tokens is not None:
                prompt_ids = prompt_ids[:max_prompt_tokens]
            return ([self.bos_id] if self.text_bos else []) + prompt_ids + self.anchor_ids
        if max_prompt_tokens is not None:
            instruction = self.encode("\n" + self.chat_instruction) if self.chat_instruction else []
            return self.chat_head_ids + self.encode(prompt.strip())[:max_prompt_tokens] + instruction + self.anchor_ids
        ids = self.encode(render_user_turn(self.tokenizer, self.user_message(prompt)))
        head, n = self.chat_head_ids, len(self.anchor_ids)
        if ids[:len(head)] != head or ids[-n:] != self.anchor_ids:
            raise ContractError(f"the chat template of {self.tokenizer.name_or_path!r} tokenizes this prompt "
                                f"into a head or header other than its own (prompt starts {prompt[:40]!r})")
        return ids

    def user_message(self, prompt: str) -> str:
        """The user's message the chat template wraps: the prompt, stripped, and the chat instruction if any."""
        return prompt.strip() + ("\n" + self.chat_instruction if self.chat_instruction else "")

    def to_dict(self) -> dict:
        out = {"anchor": self.anchor, "anchor_ids": self.anchor_ids, "latent_bos": self.latent_bos,
               "text_bos": self.text_bos, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
               "max_answer_tokens": self.max_answer_tokens, "tokenizer": tokenizer_fingerprint(self.tokenizer)}
        if self.chat_template:  # only then, so contracts saved before chat templates existed still compare equal
            out.update(chat_template=True, chat_head_ids=self.chat_head_ids, answer_prefix=self.answer_prefix,
                       chat_instruction=self.chat_instruction)
        return out


TINY_PREFIX = "tiny:"


def resolve_model_path(path: str) -> str:
    """A receiver or teacher path -> a local directory or hub id that `from_pretrained` reads.

    Hub names (`tiny:llama3`, `tiny:qwen2.5`, `real:smollm2-135m`, `real:qwen2.5-0.5b`: latentwire/hub.py) resolve
    to their cached directories, fetched on first use. `tiny:llama` / `tiny:qwen2` name the bundled tiny receivers:
    built on first use (deterministically, under a file lock so concurrent ranks build once) into
    $LATENTWIRE_TINY_DIR or <repo>/runs/receivers. Other paths are returned as they are."""
    from latentwire import hub

    if hub.is_hub_name(path):  # before the tiny: test, which `tiny:llama3` would also pass
        try:
            return str(hub.resolve(path))
        except hub.HubError as err:
            raise FileNotFoundError(f"cannot resolve receiver path {path!r}: {err}") from None
    if not path.startswith(TINY_PREFIX):
        return path
    import fcntl
    import os

    from latentwire.tiny import build_tiny_receivers

    kind = path[len(TINY_PREFIX):]
    root = Path(os.environ.get("LATENTWIRE_TINY_DIR", Path(__file__).resolve().parents[1] / "runs" / "receivers"))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        paths = build_tiny_receivers(root)
    key = f"tiny-{kind}"
    if key not in paths:
        known = [TINY_PREFIX + k[5:] for k in paths] + [n for n in hub.NAMES]
        raise FileNotFoundError(f"unknown tiny receiver {path!r}; known: {', '.join(known)}")
    return str(paths[key])


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load tokenizer from receiver path {path!r}: {err}") from None


def load_causal_lm(path: str, dtype: str):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists() and path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"receiver model path {path!r} does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load model from receiver path {path!r}: {err}") from None


class Receiver(nn.Module):
    """A frozen causal LM read through `inputs_embeds`, with its prefix contract."""

    def __init__(self, cfg: ReceiverConfig, model: nn.Module, tokenizer, max_answer_tokens: int):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.contract = PrefixContract(tokenizer, cfg.anchor, cfg.bos_policy, max_answer_tokens,
                                       chat_template=getattr(cfg, "chat_template", False),
                                       chat_instruction=getattr(cfg, "chat_instruction", ""))
        model.requires_grad_(False)
        model.eval()
        self.hidden_size = int(model.config.hidden_size)
        emb = model.get_input_embeddings().weight
        with gathered([emb]):
            from latentwire.adapters import embedding_rms

            self.embed_rms = embedding_rms(emb)
        # Per-example latent state for the features (latentwire/features): installed by `features.latent_context`
        # around every latent-path forward, read by the hooks below, None otherwise (text paths never see it).
        self.latent = None
        self._kv_source = None  # fn(latent) -> [(keys, values)] per layer, each (B, KV heads, P, head dim)
        self._kv_len = 0  # P of the cache entries the current latent wrote (so decode steps can extend the mask)
        self.train_mode_modules: list[nn.Module] = []  # feature submodules with train/eval behaviour (LoRA dropout)
        self.feature_hooks: list = []  # handles of feature hooks on decoder layers, removed when a model is rebuilt

    @classmethod
    def load(cls, cfg: ReceiverConfig, max_answer_tokens: int) -> "Receiver":
        path = resolve_model_path(cfg.path)
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, cfg.dtype)
        return cls(cfg, model, tokenizer, max_answer_tokens)

    def train(self, mode: bool = True):
        # The frozen receiver stays in eval mode (no dropout) whatever the wrapping module does; only trainable
        # feature parts inside it (LoRA dropout) follow the wrapping module.
        super().train(False)
        for module in self.train_mode_modules:
            module.train(mode)
        return self

    def kv_geometry(self) -> tuple[int, int, int]:
        """(decoder layers, key/value heads, head dim) of the receiver's KV cache; GQA-aware."""
        config = self.model.config.get_text_config(decoder=True)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return int(config.num_hidden_layers), kv_heads, head_dim

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_decoder().layers

    def set_kv_source(self, fn) -> None:
        """Every decoder forward while a latent is installed starts from a cache holding fn(latent).

        fn(latent) -> [(keys, values)] per layer, each (B, KV heads, P, head dim). Callers stay unaware: the hook
        writes those P entries into an empty cache (or a new one) on the sequence axis, prepends P ones to the 2D
        attention mask on every call (prefill and each decode step), and, when the caller gives no position ids,
        numbers the caller's own tokens from its mask (cumsum - 1) exactly as left-padded scoring and generation do.
        """
        if self._kv_source is None:  # one hook for the receiver's life; a rebuilt model (stage hand-off) swaps fn
            self.model.get_decoder().register_forward_pre_hook(self._kv_prefix_hook, with_kwargs=True)
        self._kv_source = fn

    def _kv_prefix_hook(self, module, args, kwargs):
        if self.latent is None:
            return None
        if args:
            raise TypeError("the KV prefix hook needs the decoder to be called with keyword arguments")
        from transformers import DynamicCache

        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        batch, length = x.shape[:2]
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            cache = DynamicCache(config=self.model.config) if cache is None else cache
            entries = self._kv_source(self.latent)
            for layer, (keys, values) in enumerate(entries):
                cache.update(keys.to(self.dtype), values.to(self.dtype), layer)  # concatenates on the sequence axis
            self._kv_len = entries[0][0].shape[2]
            kwargs["past_key_values"] = cache
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None:
            if mask is not None:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                start = cache.get_seq_length() - self._kv_len
                kwargs["position_ids"] = torch.arange(start, start + length, device=x.device).unsqueeze(0)
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("the KV prefix needs a 2D attention mask (B, L)")
            mask = torch.cat([mask.new_ones(batch, self._kv_len), mask], dim=1)
            if mask.shape[1] != cache.get_seq_length() + length:
                raise RuntimeError(f"attention mask covers {mask.shape[1]} positions but the cache holds "
                                   f"{cache.get_seq_length()} + {length} new: a cache not started under this latent")
            kwargs["attention_mask"] = mask
        return args, kwargs

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def decoder_hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) embeddings -> final hidden states (B, L, H), after the final norm, before the LM head."""
        out = self.model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def latent_pass(self, prefix: torch.Tensor, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor,
                    answer_start: int, k: int) -> torch.Tensor:
        """One teacher-forced pass over [P][BOS?][anchor][answer][EOS].

        prefix (B, M, H) soft tokens; suffix_ids (B, S) = [BOS?][anchor][answer][EOS] right-padded with mask
        (B, S); answer_start = index of the first answer token inside the suffix (same for all rows).
        Returns hidden (B, K, H) at the positions that predict answer tokens 0..K-1.
        """
        embeds = torch.cat([prefix.to(self.dtype), self.embed(suffix_ids[:, :-1])], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=suffix_mask.dtype, device=suffix_mask.device),
                          suffix_mask[:, :-1]], dim=1)
        hidden = self.decoder_hidden(embeds, mask)
        first = prefix.shape[1] + answer_start - 1  # position whose next token is answer token 0
        positions = torch.arange(first, first + k, device=hidden.device).clamp(max=hidden.shape[1] - 1)
        return hidden[:, positions]

    @torch.no_grad()
    def text_pass(self, text_ids: torch.Tensor, text_mask: torch.Tensor, answer_start: torch.Tensor,
                  k: int) -> torch.Tensor:
        """Teacher pass over [BOS][prompt][anchor][answer][EOS]; answer_start (B,) per row. -> hidden (B, K, H)."""
        hidden = self.decoder_hidden(self.embed(text_ids[:, :-1]), text_mask[:, :-1])
        positions = (answer_start.unsqueeze(1) - 1 + torch.arange(k, device=hidden.device)).clamp(
            max=hidden.shape[1] - 1)
        return torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @torch.no_grad()
    def generate(self, attention_mask: torch.Tensor, max_new_tokens: int, input_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, synced: bool = False) -> list[list[int]]:
        """Greedy decoding from a left-padded prefix (token ids or embeddings) with a KV cache.

        Stops at EOS or max_new_tokens, never earlier; returns the new token ids of each row, EOS excluded.
        `synced` keeps ZeRO-3 ranks stepping together until every rank has finished.
        """
        kwargs = dict(attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                      eos_token_id=self.contract.eos_id, pad_token_id=self.contract.pad_id, synced_gpus=synced,
                      temperature=None, top_p=None, top_k=None)
        if input_ids is not None:
            out = self.model.generate(input_ids=input_ids, **kwargs)[:, input_ids.shape[1]:]
        else:
            out = self.model.generate(inputs_embeds=inputs_embeds.to(self.dtype), **kwargs)
        results = []
        for row in out.tolist():
            tokens = []
            for tok in row:
                if tok == self.contract.eos_id:
                    break
                tokens.append(tok)
            results.append(tokens)
        return results

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def max_hidden_size(receivers) -> int:
    """The largest width H over `receivers` (ReceiverConfigs), read from the model configs alone (no weights)."""
    from transformers import AutoConfig

    sizes = []
    for r in receivers:
        try:
            sizes.append(int(AutoConfig.from_pretrained(resolve_model_path(r.path)).hidden_size))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot read the model config of receiver {r.name!r} at {r.path!r}: {err}") from None
    return max(sizes)
