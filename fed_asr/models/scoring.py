"""Closed-set answer scoring: log-likelihood of every candidate answer given the prompt.

Two exact methods:

- ``packed`` (fast): one forward pass per batch. Each row holds its prompt followed by
  every candidate's tokens but the last, in separate branches: a 4-D attention mask lets
  a branch see the prompt and its own earlier tokens only (the prompt attends to
  itself as the family does: causally, or bidirectionally for prefix-LM families such
  as PaliGemma), and each branch's position ids continue from the prompt's last
  position (the family's positions: PaliGemma's start at 1, Qwen2-VL's are M-RoPE
  triples in which the image keeps its spatial positions). When every candidate is a
  single token (no EOS), this is a forward pass over the prompts only, read at the
  answer position.
- ``teacher_forcing`` (general reference): one row per (sample, candidate).

Two evaluation protocols read the same scores (``EVAL_PROTOCOLS``): ``all`` ranks
every candidate answer; ``type`` ranks only the answers of the question's skill
(e.g. yes/no for existence, the colours for colour), given per sample as a boolean
mask over the candidates (``allowed_answers_mask``). ``predict_protocols`` returns
both from one forward pass by masking the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fed_asr.models.batching import continuation_ids
from fed_asr.models.capture import SELECTIVE_ATTENTION, SELECTIVE_EAGER_ATTENTION
from fed_asr.models.device import model_dtype
from fed_asr.models.modules import model_family, text_config, unwrap

if TYPE_CHECKING:
    from fed_asr.data import ContinualStream, VQASample

SCORING_METHODS = ("auto", "packed", "teacher_forcing")
EVAL_PROTOCOLS = ("all", "type")
# Attention implementations that accept an arbitrary additive 4-D mask.
_MASKABLE = ("sdpa", "eager", SELECTIVE_ATTENTION, SELECTIVE_EAGER_ATTENTION)


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


def _image_token_id(model: nn.Module) -> int:
    """Image token id of the model's config (-1 when it has none)."""
    token = getattr(unwrap(model).config, "image_token_id", None)
    return -1 if token is None else int(token)


def _score_packed(
    model: nn.Module, batch: Mapping[str, Any], candidate_ids: Sequence[Sequence[int]]
) -> Tensor:
    """All candidates of a batch in one forward pass (see the module docstring)."""
    family = model_family(model)
    input_ids = batch["input_ids"]
    device = input_ids.device
    n = batch["prompt_length"].cpu()  # (B,)
    batch_size = input_ids.shape[0]
    fed, fed_pos, block, read, targets, owner = _packed_layout(n, candidate_ids)
    n_fed = fed.numel()
    total = int(n.max()) + n_fed
    prompt_positions = family.position_ids(model, batch).cpu()  # (..., B, S)
    lead = tuple(prompt_positions.shape[:-2])  # () or (3,) for M-RoPE
    ids = torch.full((batch_size, total), _pad_id(model), dtype=torch.long)
    positions = torch.zeros((*lead, batch_size, total), dtype=torch.long)
    allowed = torch.eye(total, dtype=torch.bool).repeat(batch_size, 1, 1)  # (B, T, T)
    source = input_ids.cpu()
    for i, length in enumerate(n.tolist()):
        ids[i, :length] = source[i, :length]
        ids[i, length : length + n_fed] = fed
        positions[..., i, :length] = prompt_positions[..., i, :length]
        last = prompt_positions[..., i, length - 1 : length]  # (..., 1)
        positions[..., i, length : length + n_fed] = last + 1 + fed_pos
        prompt = torch.ones(length, length, dtype=torch.bool)
        allowed[i, :length, :length] = prompt if family.prefix_lm else prompt.tril()
        allowed[i, length : length + n_fed, :length] = True
        allowed[i, length : length + n_fed, length : length + n_fed] = block
    dtype = getattr(unwrap(model), "dtype", None) or model_dtype(model)
    mask = torch.zeros((batch_size, 1, total, total), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)  # (B, 1, T, T)
    extra = family.token_inputs_of(ids, n, _image_token_id(model))
    rows = torch.arange(batch_size)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=read.to(device),
        use_cache=False,
        **family.select_images(batch, rows),
        **{k: v.to(device) for k, v in extra.items()},
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
    family = model_family(model)
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
        owners = torch.tensor([i for i, _ in chunk])
        lengths = torch.tensor([n[i] for i, _ in chunk])
        extra = family.token_inputs_of(ids, lengths, _image_token_id(model))
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            logits_to_keep=read.to(device),
            use_cache=False,
            **family.select_images(batch, owners),
            **{k: v.to(device) for k, v in extra.items()},
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
        An MLLM of a registered family (optionally a peft model), in eval mode.
    batch : Mapping[str, Any]
        Output of ``VQACollator`` on the model's device (its answers are ignored; only
        ``prompt_length`` tokens of each row are used).
    candidate_ids : Sequence[Sequence[int]]
        From ``candidate_token_ids``.
    method : str
        ``"auto"`` (``packed`` unless the language model's attention cannot take a
        4-D mask, e.g. flash attention, or a sliding window is shorter than the
        packed rows), ``"packed"`` or ``"teacher_forcing"``.
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
        config = text_config(model)
        maskable = config._attn_implementation in _MASKABLE
        # a 4-D mask replaces the model's own masks, sliding windows included
        window = getattr(config, "sliding_window", None)
        longest = int(batch["prompt_length"].max()) + sum(len(c) for c in candidate_ids)
        fits = window is None or longest <= int(window)
        method = "packed" if maskable and fits else "teacher_forcing"
    with torch.no_grad():
        if method == "packed":
            return _score_packed(model, batch, candidate_ids)
        return _score_teacher_forcing(model, batch, candidate_ids, chunk_size)


def predict(
    model: nn.Module,
    batch: Mapping[str, Any],
    candidate_ids: Sequence[Sequence[int]],
    method: str = "auto",
    allowed: Tensor | None = None,
) -> Tensor:
    """Index (B,) of the most likely candidate (among ``allowed`` when given)."""
    scores = score_candidates(model, batch, candidate_ids, method)
    return restrict_scores(scores, allowed).argmax(dim=-1)


def predict_protocols(
    model: nn.Module,
    batch: Mapping[str, Any],
    candidate_ids: Sequence[Sequence[int]],
    allowed: Tensor | None = None,
    method: str = "auto",
    chunk_size: int = 64,
) -> dict[str, Tensor]:
    """Predictions under both evaluation protocols from one scoring pass.

    Parameters
    ----------
    model, batch, candidate_ids, method, chunk_size
        As in ``score_candidates``.
    allowed : Tensor | None
        (B, C) bool, the candidates of each sample's skill (``allowed_answers_mask``);
        ``None`` makes ``type`` equal to ``all``.

    Returns
    -------
    dict[str, Tensor]
        ``{"all": (B,), "type": (B,)}`` candidate indices.
    """
    scores = score_candidates(model, batch, candidate_ids, method, chunk_size)
    return {
        "all": scores.argmax(dim=-1),
        "type": restrict_scores(scores, allowed).argmax(dim=-1),
    }


def restrict_scores(scores: Tensor, allowed: Tensor | None) -> Tensor:
    """Set the scores of disallowed candidates to -inf.

    Parameters
    ----------
    scores : Tensor
        (B, C) candidate scores.
    allowed : Tensor | None
        (B, C) bool; ``None`` returns ``scores`` unchanged. A row with no allowed
        candidate is left unrestricted.

    Returns
    -------
    Tensor
        (B, C) masked scores.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if allowed is None:
        return scores
    if allowed.shape != scores.shape:
        raise ValueError(
            f"`allowed` must have shape {tuple(scores.shape)}, "
            f"got {tuple(allowed.shape)}."
        )
    allowed = allowed.to(device=scores.device, dtype=torch.bool)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # empty row: all allowed
    return scores.masked_fill(~allowed, float("-inf"))


def skill_answer_sets(
    samples: Iterable[VQASample],
    skill_of: Callable[[VQASample], str] | None = None,
) -> dict[str, list[str]]:
    """Answers seen for each skill in (training) rows.

    Parameters
    ----------
    samples : Iterable[VQASample]
        Rows with ``answer`` and a skill.
    skill_of : Callable[[VQASample], str] | None
        The skill of a sample; ``None`` uses ``sample.skill`` or, when unset, the
        easy-VQA question parser (``fed_asr.data.skills.question_skill``).

    Returns
    -------
    dict[str, list[str]]
        Skill -> its sorted answers (the ``type`` protocol's candidate sets).
    """
    get_skill = sample_skill if skill_of is None else skill_of
    sets: dict[str, set[str]] = {}
    for sample in samples:
        sets.setdefault(get_skill(sample), set()).add(sample.answer)
    return {skill: sorted(answers) for skill, answers in sorted(sets.items())}


def stream_skill_answers(stream: ContinualStream) -> dict[str, list[str]]:
    """``skill_answer_sets`` of every training row of ``stream``.

    The ``type`` protocol's candidates for a whole run: the central engine, every
    client and the server's ``unlearned_skills`` check read the same sets.
    """
    return skill_answer_sets(s for stage in stream.stages for s in stage.train)


def sample_skill(sample: VQASample) -> str:
    """``sample.skill``, else the easy-VQA parser's skill of its question."""
    from fed_asr.data.skills import question_skill  # fed_asr.data imports models

    return sample.skill or question_skill(sample.question)


def allowed_answers_mask(
    skills: Sequence[str],
    answers: Sequence[str],
    skill_answers: Mapping[str, Collection[str]],
) -> Tensor:
    """Per-sample candidate mask of the ``type`` protocol.

    Parameters
    ----------
    skills : Sequence[str]
        The skill of each sample of the batch.
    answers : Sequence[str]
        The candidate answers, in scoring order (the collator's ``answers``).
    skill_answers : Mapping[str, Collection[str]]
        Skill -> allowed answers (``skill_answer_sets``).

    Returns
    -------
    Tensor
        (B, C) bool. A skill missing from ``skill_answers`` allows every candidate.
    """
    index = {a: j for j, a in enumerate(answers)}
    mask = torch.zeros((len(skills), len(answers)), dtype=torch.bool)
    for b, skill in enumerate(skills):
        if skill not in skill_answers:
            mask[b] = True
            continue
        for answer in skill_answers[skill]:
            if answer in index:
                mask[b, index[answer]] = True
    return mask
