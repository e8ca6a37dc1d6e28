"""Weights of the text query tokens that average attention into one map per head.

DESIGN section 2, step 2: the paper's code weights the text queries by a
"functional token" mask that masks out the prompt's function words (question words,
auxiliaries, determiners, prepositions, ...), so the map averages the content words'
attention, and falls back to uniform weights over the prompt when a question has no
content word. This project's earlier choice weights every
prompt token after the image (``mode="prompt"``); ``mode="readout"`` keeps only the
prompt's last token, the one that predicts the answer.

The capture's query rows are the positions ``image_end..S-1`` of the batch; the
collator's ``query_mask`` (B, Tq) marks the prompt tokens among them. Build the
function-word mask over the same rows, e.g.
``function_word_mask(batch["input_ids"][:, image_end:], tokenizer=tokenizer)``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from fed_asr.config_sections import QUERY_TOKEN_MODES

__all__ = [
    "FUNCTION_WORDS",
    "QUERY_TOKEN_MODES",
    "function_word_mask",
    "normalise_token",
    "query_token_weights",
]


# Closed-class English words: question words, auxiliaries, determiners, pronouns,
# prepositions, conjunctions and negation.
FUNCTION_WORDS: frozenset[str] = frozenset(
    """
    what which who whom whose where when why how many much
    is are was were be been being am do does did can could will would shall should
    may might must has have had
    a an the this that these those there here any some no not none each every all
    both either neither other another
    i me my you your he him his she her it its we us our they them their
    of in on at to from with by for about above below under over between among
    into onto through near behind beside inside outside against along around
    and or but if than then so as
    """.split()
)

# Marks of word starts / continuations in common subword vocabularies.
_SUBWORD_MARKS = ("\u2581", "\u0120", "##", "</w>")


def normalise_token(token: str) -> str:
    """Lower-case ``token`` without subword marks and surrounding punctuation."""
    for mark in _SUBWORD_MARKS:
        token = token.replace(mark, "")
    return token.strip().strip(string.punctuation).lower()


def function_word_mask(
    tokens: Sequence[Sequence[str]] | Tensor,
    function_words: Iterable[str] | None = None,
    tokenizer: Any | None = None,
) -> Tensor:
    """Mark the query tokens that are function words.

    Parameters
    ----------
    tokens : Sequence[Sequence[str]] | Tensor
        Token strings per row (rows may differ in length; shorter rows are padded
        with False), or a (B, T) tensor of token ids (then ``tokenizer`` is needed).
    function_words : Iterable[str] | None
        The word list (compared after ``normalise_token``); ``None`` uses
        ``FUNCTION_WORDS``.
    tokenizer : Any | None
        A tokenizer with ``convert_ids_to_tokens``, used when ``tokens`` holds ids.

    Returns
    -------
    Tensor
        (B, T) bool, True where the token is a function word. A word split into
        several subword tokens matches only when one token spells it whole.

    Raises
    ------
    ValueError
        If ``tokens`` holds ids and no ``tokenizer`` is given.
    """
    words = (
        FUNCTION_WORDS
        if function_words is None
        else frozenset(normalise_token(w) for w in function_words)
    )
    device = None
    if isinstance(tokens, Tensor):
        if tokenizer is None:
            raise ValueError("`tokenizer` is required when `tokens` holds token ids.")
        device = tokens.device
        rows: Sequence[Sequence[str]] = [
            tokenizer.convert_ids_to_tokens(row) for row in tokens.cpu().tolist()
        ]
    else:
        rows = tokens
    width = max((len(r) for r in rows), default=0)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, row in enumerate(rows):
        for t, token in enumerate(row):
            mask[b, t] = normalise_token(str(token)) in words
    return mask if device is None else mask.to(device)


def query_token_weights(
    query_mask: Tensor,
    function_mask: Tensor | None = None,
    mode: str = "function_words",
) -> Tensor:
    """Float weights of the query rows for ``fed_asr.spectral.describe``.

    Parameters
    ----------
    query_mask : Tensor
        (B, Tq) bool, True on the prompt tokens after the image (the collator's).
    function_mask : Tensor | None
        (B, Tq) bool from ``function_word_mask``; ``None`` counts as no function
        word anywhere.
    mode : str
        ``"function_words"`` (paper): function words masked out (the prompt's
        content words), or the whole prompt for a row without a content word;
        ``"prompt"``: the whole prompt; ``"readout"`` (ours): only the prompt's last
        token, the position whose next-token distribution is the answer's first
        token (the attention that reads the answer out of the image).

    Returns
    -------
    Tensor
        (B, Tq) float32 0/1 weights (``describe`` normalises them per row).

    Raises
    ------
    ValueError
        If ``mode`` is unknown or the shapes differ.
    """
    if mode not in QUERY_TOKEN_MODES:
        raise ValueError(
            f"`mode` must be one of {sorted(QUERY_TOKEN_MODES)}, got {mode!r}."
        )
    prompt = query_mask.bool()
    if mode == "readout":
        after = prompt.flip(1).long().cumsum(1).flip(1)  # prompt tokens at or after
        return (prompt & (after == 1)).float()
    if mode == "prompt" or function_mask is None:
        return prompt.float()
    if function_mask.shape != query_mask.shape:
        raise ValueError(
            f"`function_mask` must have shape {tuple(query_mask.shape)}, "
            f"got {tuple(function_mask.shape)}."
        )
    chosen = prompt & ~function_mask.to(prompt.device).bool()  # (B, Tq) content
    has_any = chosen.any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(has_any, chosen, prompt).float()
