"""Question skills: a rule-based easy-VQA parser and soft skill probabilities.

Why soft probabilities (DESIGN.md, section 6): a sample only meets the prototypes of
skills it has probability on. In a stream where every stage brings a new question type,
one-hot skills would never touch an old skill's prototype, so the spectral loss would be
zero throughout. A question also exercises the perceptual aspects it names: "is there a
red shape?" is an existence question that needs colour perception, "what color is the
circle?" a colour question that needs shape perception. The primary type therefore
gets most of the mass (``primary_mass``, 0.7 by default) and the named aspects share
the rest, which lets old-skill prototypes act on new-skill data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from fed_asr.data.samples import EASYVQA_COLORS, EASYVQA_SHAPES, VQASample, tokenize

EASYVQA_SKILLS: tuple[str, ...] = ("shape", "color", "existence", "negated_existence")

# easy-VQA question templates per primary skill; X is a colour or shape word.
QUESTION_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "shape": (
        "what shape is in the image?",
        "what shape does the image contain?",
        "what shape is present?",
        "what is the X shape?",
    ),
    "color": (
        "what color is the shape?",
        "what color is the X?",
        "what is the color of the X?",
        "what is the color of the shape?",
    ),
    "existence": (
        "is a X shape present?",
        "is there a X shape?",
        "does the image contain a X shape?",
        "is there a X shape in the image?",
        "is a X present?",
        "is there a X?",
        "does the image contain a X?",
        "is there a X in the image?",
    ),
    "negated_existence": (
        "does the image not contain a X shape?",
        "is there not a X shape?",
        "is there not a X shape in the image?",
        "is no X shape present?",
        "is no X present?",
        "is there not a X?",
        "does the image not contain a X?",
        "is there not a X in the image?",
    ),
}

DEFAULT_PRIMARY_MASS = 0.7


def _compile_templates() -> tuple[tuple[re.Pattern[str], str], ...]:
    """Regexes over space-joined tokens, one per template, with the skill it marks."""
    patterns = []
    for skill, templates in QUESTION_TEMPLATES.items():
        for template in templates:
            # `tokenize` lower-cases the slot X to the token "x"
            body = " ".join(
                "[a-z]+" if tok == "x" else re.escape(tok) for tok in tokenize(template)
            )
            patterns.append((re.compile(f"^{body}$"), skill))
    return tuple(patterns)


_PATTERNS = _compile_templates()


@dataclass(frozen=True)
class ParsedQuestion:
    """Result of parsing one question.

    Parameters
    ----------
    skill : str
        Primary question type (one of ``EASYVQA_SKILLS``).
    colors : tuple[str, ...]
        easy-VQA colour words in the question.
    shapes : tuple[str, ...]
        easy-VQA shape words in the question (the generic word "shape" is not one).
    """

    skill: str
    colors: tuple[str, ...]
    shapes: tuple[str, ...]

    @property
    def aspects(self) -> tuple[str, ...]:
        """Perceptual skills the question names besides its primary type."""
        named = (("color", self.colors), ("shape", self.shapes))
        return tuple(s for s, words in named if words and s != self.skill)


@lru_cache(maxsize=4096)
def parse_question(question: str) -> ParsedQuestion:
    """Parse an easy-VQA question into its primary type and the words it names.

    Parameters
    ----------
    question : str
        Question text; case and spacing around punctuation are ignored.

    Returns
    -------
    ParsedQuestion
        Primary skill and the colour/shape words of the question.

    Raises
    ------
    ValueError
        The question matches no template.
    """
    tokens = tokenize(question)
    text = " ".join(tokens)
    for pattern, skill in _PATTERNS:
        if pattern.match(text):
            colors = tuple(t for t in tokens if t in EASYVQA_COLORS)
            shapes = tuple(t for t in tokens if t in EASYVQA_SHAPES)
            return ParsedQuestion(skill, colors, shapes)
    raise ValueError(
        f"Question {question!r} matches no easy-VQA template; give the sample an "
        "explicit `skill` or pass a `fallback` skill. Known types: "
        f"{list(EASYVQA_SKILLS)}."
    )


def question_skill(question: str) -> str:
    """Primary skill of a question (see ``parse_question``)."""
    return parse_question(question).skill


def skill_distribution(
    question: str, *, primary_mass: float = DEFAULT_PRIMARY_MASS
) -> dict[str, float]:
    """Soft skill probabilities of one question.

    Parameters
    ----------
    question : str
        An easy-VQA question.
    primary_mass : float
        Probability of the primary type when the question names other aspects; the
        rest is split equally among them. Must be in (0, 1].

    Returns
    -------
    dict[str, float]
        Skill -> probability, summing to 1, e.g. ``"is there a red shape?"`` ->
        ``{"existence": 0.7, "color": 0.3}``; ``"what color is the shape?"`` ->
        ``{"color": 1.0}``.

    Raises
    ------
    ValueError
        Unknown question, or ``primary_mass`` outside (0, 1].
    """
    if not 0.0 < primary_mass <= 1.0:
        raise ValueError(f"`primary_mass` must be in (0, 1], got {primary_mass}.")
    parsed = parse_question(question)
    aspects = parsed.aspects
    if not aspects or primary_mass == 1.0:
        return {parsed.skill: 1.0}
    share = (1.0 - primary_mass) / len(aspects)
    return {parsed.skill: primary_mass, **{a: share for a in aspects}}


def skill_probabilities(
    samples: Sequence[VQASample],
    skills: Sequence[str],
    *,
    primary_mass: float = DEFAULT_PRIMARY_MASS,
    fallback: str | None = None,
) -> Tensor:
    """Skill probabilities of a batch of samples.

    A sample's explicit ``skill`` wins (one-hot). Otherwise the question is parsed
    (``skill_distribution``); aspects outside ``skills`` are dropped and the row is
    renormalised.

    Parameters
    ----------
    samples : Sequence[VQASample]
        The batch.
    skills : Sequence[str]
        Skill names giving the column order.
    primary_mass : float
        See ``skill_distribution``.
    fallback : str | None
        Skill given (one-hot) to questions the parser does not know; ``None`` raises.

    Returns
    -------
    Tensor
        ``(N, S)`` float32, every row sums to 1.

    Raises
    ------
    ValueError
        An explicit or parsed primary skill (or ``fallback``) not in ``skills``, or an
        unknown question without ``fallback``.
    """
    index = {name: i for i, name in enumerate(skills)}
    if fallback is not None and fallback not in index:
        raise ValueError(
            f"`fallback` {fallback!r} is not one of `skills` {list(skills)}."
        )
    probs = torch.zeros(len(samples), len(index), dtype=torch.float32)  # (N, S)
    for row, sample in enumerate(samples):
        if sample.skill is not None:
            dist = {sample.skill: 1.0}
        else:
            try:
                dist = skill_distribution(sample.question, primary_mass=primary_mass)
            except ValueError:
                if fallback is None:
                    raise
                dist = {fallback: 1.0}
        primary = next(iter(dist))
        if primary not in index:
            raise ValueError(
                f"Skill {primary!r} of question {sample.question!r} is not one of "
                f"`skills` {list(skills)}."
            )
        kept = {s: p for s, p in dist.items() if s in index}
        total = sum(kept.values())
        for skill, p in kept.items():
            probs[row, index[skill]] = p / total
    return probs
