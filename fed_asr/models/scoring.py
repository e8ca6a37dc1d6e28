"""Closed-set answer scoring: log-likelihood of every candidate answer given the prompt.

Two exact methods:

- ``packed`` (fast): one forward pass per batch. Each row holds its prompt followed by
  every candidate's tokens but the last, in separate branches: a 4-D attention mask lets
  a branch see the prompt and its own earlier tokens only, and position ids restart at
  the prompt length in each branch. When every candidate is a single token (no EOS),
  this is a forward pass over the prompts only, read at the answer position.
- ``teacher_forcing`` (general reference): one row per (sample, candidate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fed_asr.models.batching import continuation_ids
from fed_asr.models.capture import SELECTIVE_ATTENTION
from fed_asr.models.device import model_dtype
from fed_asr.models.modules import text_config, unwrap

SCORING_METHODS = ("auto", "packed", "teacher_forcing")
# Attention implementations that accept an arbitrary additive 4-D mask.
_MASKABLE = ("sdpa", "eager", SELECTIVE_ATTENTION)


def candidate_token_ids(
    processor: Any, answers: Sequence[str], context: str = ":", eos: bool = True
) -> list[list[int]]:
    """Token ids of each candidate answer as it follows a prompt, plus EOS.

    Parameters
    ----------
    processor : Any
        A processor with a ``tokenizer`` (or a tokenizer).
    answers : Sequence[str]
        Candidate answers.
    context : str
        Text the answer follows (the end of the prompt); the answer is tokenized as
        ``" " + answer`` after it, as ``VQACollator`` builds labels.
    eos : bool
        Append EOS (as in training labels). Without it, single-word answers are one
        token each and scoring reads one position per row.

    Returns
    -------
    list[list[int]]
        One id list per answer.

    Raises
    ------
    ValueError
        An answer that tokenizes to no token.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = continuation_ids(tokenizer, [context] * len(answers), list(answers))
    for answer, tokens in zip(answers, ids, strict=True):
        if not tokens:
            raise ValueError(f"Candidate answer {answer!r} tokenizes to no token.")
    suffix = [tokenizer.eos_token_id] if eos else []
    return [tokens + suffix for tokens in ids]


def _pad_id(model: nn.Module) -> int:
    """Pick a token id for padding slots (masked out; never the image token)."""
    config = unwrap(model).config
    text = config.text_config
    for candidate in (text.pad_token_id, text.eos_token_id, 0):
        if candidate is not None and candidate != getattr(
            config, "image_token_id", None
        ):
            return int(candidate)
    return 1


def _log_prob(logits: Tensor, index: Tensor) -> Tensor:
    """Log-softmax of ``logits`` (N, K, V) at ``index`` (N, K, 1), in float32."""
    logits = logits.float()
    return (logits.gather(-1, index) - logits.logsumexp(-1, keepdim=True)).squeeze(-1)


def _packed_layout(
    prompt_length: Tensor, candidate_ids: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Branch layout: fed tokens, positions, mask block, read index, target, owner."""
    fed = [list(c[:-1]) for c in candidate_ids]
    sizes = [len(f) for f in fed]
    n_fed = sum(sizes)
    offsets = torch.tensor([0, *sizes]).cumsum(0)[:-1].tolist()
    fed_tokens = torch.tensor([t for f in fed for t in f], dtype=torch.long)  # (A,)
    fed_positions = torch.tensor([k for s in sizes for k in range(s)], dtype=torch.long)
    block = torch.zeros((n_fed, n_fed), dtype=torch.bool)  # branch-causal (A, A)
    for off, size in zip(offsets, sizes, strict=True):
        block[off : off + size, off : off + size] = torch.ones(size, size).tril().bool()
    # Logit read for token k of candidate j: the prompt's last position when k = 0,
    # else the branch position of token k - 1 (relative to the prompt length).
    rel = [
        -1 if k == 0 else off + k - 1
        for c, off in zip(candidate_ids, offsets, strict=True)
        for k in range(len(c))
    ]
    targets = torch.tensor(
        [t for c in candidate_ids for t in c], dtype=torch.long
    )  # (K,)
    owner = torch.tensor([j for j, c in enumerate(candidate_ids) for _ in c])  # (K,)
    read = prompt_length[:, None].cpu() + torch.tensor(rel)[None, :]  # (B, K)
    return fed_tokens, fed_positions, block, read, targets, owner


def _score_packed(
    model: nn.Module, batch: Mapping[str, Any], candidate_ids: Sequence[Sequence[int]]
) -> Tensor:
    """All candidates of a batch in one forward pass (see the module docstring)."""
    input_ids = batch["input_ids"]
    device = input_ids.device
    n = batch["prompt_length"].cpu()  # (B,)
    batch_size = input_ids.shape[0]
    fed, fed_pos, block, read, targets, owner = _packed_layout(n, candidate_ids)
    n_fed = fed.numel()
    total = int(n.max()) + n_fed
    ids = torch.full((batch_size, total), _pad_id(model), dtype=torch.long)
    positions = torch.zeros((batch_size, total), dtype=torch.long)
    allowed = torch.eye(total, dtype=torch.bool).repeat(batch_size, 1, 1)  # (B, T, T)
    source = input_ids.cpu()
    for i, length in enumerate(n.tolist()):
        ids[i, :length] = source[i, :length]
        ids[i, length : length + n_fed] = fed
        positions[i, :length] = torch.arange(length)
        positions[i, length : length + n_fed] = length + fed_pos
        allowed[i, :length, :length] = torch.ones(length, length).tril().bool()
        allowed[i, length : length + n_fed, :length] = True
        allowed[i, length : length + n_fed, length : length + n_fed] = block
    dtype = getattr(unwrap(model), "dtype", None) or model_dtype(model)
    mask = torch.zeros((batch_size, 1, total, total), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)  # (B, 1, T, T)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        pixel_values=batch["pixel_values"],
        logits_to_keep=read.to(device),
        use_cache=False,
    )
    index = targets.to(device)[None, :, None].expand(batch_size, -1, 1)  # (B, K, 1)
    picked = _log_prob(out.logits, index)  # (B, K)
    scores = torch.zeros((batch_size, len(candidate_ids)), device=device)
    return scores.index_add_(1, owner.to(device), picked)  # (B, C)


def _score_teacher_forcing(
    model: nn.Module,
    batch: Mapping[str, Any],
    candidate_ids: Sequence[Sequence[int]],
    chunk_size: int,
) -> Tensor:
    """One right-padded row per (sample, candidate), processed in chunks of rows."""
    input_ids = batch["input_ids"]
    device = input_ids.device
    n = batch["prompt_length"].cpu().tolist()
    source = input_ids.cpu()
    pad_id = _pad_id(model)
    n_cand = len(candidate_ids)
    pairs = [(i, j) for i in range(len(n)) for j in range(n_cand)]
    scores = torch.zeros(len(pairs), device=device)
    longest = max(len(c) for c in candidate_ids)
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        rows = [source[i, : n[i]].tolist() + list(candidate_ids[j]) for i, j in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        read = torch.zeros((len(rows), longest), dtype=torch.long)
        targets = torch.zeros((len(rows), longest), dtype=torch.long)
        weight = torch.zeros((len(rows), longest))
        for r, (row, (i, j)) in enumerate(zip(rows, chunk, strict=True)):
            m = len(candidate_ids[j])
            ids[r, : len(row)] = torch.tensor(row)
            attn[r, : len(row)] = 1
            read[r, :m] = torch.arange(n[i] - 1, n[i] - 1 + m)
            targets[r, :m] = torch.tensor(candidate_ids[j])
            weight[r, :m] = 1.0
        pixels = batch["pixel_values"][
            torch.tensor([i for i, _ in chunk], device=device)
        ]
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            pixel_values=pixels,
            logits_to_keep=read.to(device),
            use_cache=False,
        )
        picked = _log_prob(out.logits, targets.to(device)[..., None])  # (R, M)
        scores[start : start + len(chunk)] = (picked * weight.to(device)).sum(-1)
    return scores.view(len(n), n_cand)  # (B, C)


def score_candidates(
    model: nn.Module,
    batch: Mapping[str, Any],
    candidate_ids: Sequence[Sequence[int]],
    method: str = "auto",
    chunk_size: int = 64,
) -> Tensor:
    """Log-likelihood of each candidate answer given each prompt of the batch.

    Parameters
    ----------
    model : nn.Module
        A LLaVA-family model (optionally a peft model), in eval mode.
    batch : Mapping[str, Any]
        Output of ``VQACollator`` on the model's device (its answers are ignored; only
        ``prompt_length`` tokens of each row are used).
    candidate_ids : Sequence[Sequence[int]]
        From ``candidate_token_ids``.
    method : str
        ``"auto"`` (``packed`` unless the language model's attention cannot take a
        4-D mask, e.g. flash attention), ``"packed"`` or ``"teacher_forcing"``.
    chunk_size : int
        Rows per forward pass of ``teacher_forcing``.

    Returns
    -------
    Tensor
        (B, C) float32 sums of token log-probabilities.

    Raises
    ------
    ValueError
        Unknown ``method``, or no / empty candidates.
    """
    if method not in SCORING_METHODS:
        raise ValueError(
            f"`method` must be one of {list(SCORING_METHODS)}, got {method!r}."
        )
    if not candidate_ids or any(len(c) == 0 for c in candidate_ids):
        raise ValueError("`candidate_ids` must hold at least one non-empty candidate.")
    if method == "auto":
        maskable = text_config(model)._attn_implementation in _MASKABLE
        method = "packed" if maskable else "teacher_forcing"
    with torch.no_grad():
        if method == "packed":
            return _score_packed(model, batch, candidate_ids)
        return _score_teacher_forcing(model, batch, candidate_ids, chunk_size)


def predict(
    model: nn.Module,
    batch: Mapping[str, Any],
    candidate_ids: Sequence[Sequence[int]],
    method: str = "auto",
) -> Tensor:
    """Index (B,) of the most likely candidate answer of each row."""
    return score_candidates(model, batch, candidate_ids, method).argmax(dim=-1)
