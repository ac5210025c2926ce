"""Fair text baselines: what a receiver reads when it gets text under the latent's budget instead of the latent.

Every baseline keeps the prompt's template and its WHOLE question, and fills what is left of the budget with the
context from its start (the same context the `text` path reads, already cut to data.max_prompt_bytes):

    token_budget   prompt tokens (BOS and anchor excluded; template and question included) <= M_m, the slots
                   receiver m reads from the wire
    byte_budget    UTF-8 bytes of the prompt <= that example's payload bytes, header included (one budget per wire
                   precision)
    closed_book    the question alone ("Question: ...\n"): the floor that shows what the context adds

When the template and question alone exceed the budget, the question is kept whole with no context and the
example is counted as an overrun (reported in metrics.json), never silently cut.

    python -c "from latentwire.baselines import fit_prompt; print(fit_prompt('ctx ' * 50, 'Why?', lambda t: len(t) < 60))"
"""

from __future__ import annotations

from collections.abc import Callable

from latentwire.data import PROMPT_TEMPLATE

QUESTION_TEMPLATE = "Question: {question}\n"


def closed_book_prompt(question: str) -> str:
    """The question without any context."""
    return QUESTION_TEMPLATE.format(question=question)


def fit_prompt(context: str, question: str, fits: Callable[[str], bool]) -> tuple[str, bool]:
    """The prompt with the longest context prefix (in characters) for which `fits(prompt)` holds, the whole
    question always kept -> (prompt, overrun). `overrun` is True when even the empty-context prompt does not fit
    (it is returned all the same: the question is never cut).

    Binary search over the cut point: exact for bytes; for tokens a longer prefix almost always has at least as
    many tokens, and the returned prompt is checked to fit either way."""
    full = PROMPT_TEMPLATE.format(context=context, question=question)
    if fits(full):
        return full, False
    empty = PROMPT_TEMPLATE.format(context="", question=question)
    if not fits(empty):
        return empty, True
    lo, hi = 0, len(context)  # fits(context[:lo]) holds, fits(context[:hi]) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(PROMPT_TEMPLATE.format(context=context[:mid], question=question)):
            lo = mid
        else:
            hi = mid
    return PROMPT_TEMPLATE.format(context=context[:lo], question=question), False


def token_budget_prompt(context: str, question: str, encode: Callable[[str], list[int]],
                        max_tokens: int) -> tuple[str, bool]:
    """At most `max_tokens` prompt tokens as `encode` (the receiver's tokenizer, no special tokens) counts them."""
    return fit_prompt(context, question, lambda text: len(encode(text)) <= max_tokens)


def byte_budget_prompt(context: str, question: str, max_bytes: int) -> tuple[str, bool]:
    """At most `max_bytes` UTF-8 bytes (the cut never splits a character)."""
    return fit_prompt(context, question, lambda text: len(text.encode("utf-8")) <= max_bytes)
