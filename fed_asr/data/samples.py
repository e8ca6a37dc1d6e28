"""Sample, stage and stream containers, and the word-level tokenization of text."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# easy-VQA draws one shape of one of these colours per image.
EASYVQA_COLORS: tuple[str, ...] = (
    "black",
    "blue",
    "brown",
    "gray",
    "green",
    "red",
    "teal",
    "yellow",
)
EASYVQA_SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

# Question of the caption samples used to prepare the tiny base model; the answer is
# "<color> <shape>".
CAPTION_QUESTION = "caption"
CAPTION_WORDS: tuple[str, ...] = (CAPTION_QUESTION, *EASYVQA_COLORS, *EASYVQA_SHAPES)

_PUNCTUATION = re.compile(r"([?:,.])")


def tokenize(text: str) -> list[str]:
    """Split text into lower-cased words, with ``?``, ``:``, ``,`` and ``.`` separate.

    Parameters
    ----------
    text : str
        A question, answer or prompt.

    Returns
    -------
    list[str]
        Tokens in order, e.g. ``"Is there a circle?"`` -> ``["is", "there", "a",
        "circle", "?"]``.
    """
    return _PUNCTUATION.sub(r" \1 ", text.lower()).split()


@dataclass(frozen=True)
class VQASample:
    """One visual question with its answer.

    Parameters
    ----------
    image : str
        Path of the image file.
    question : str
        Question text.
    answer : str
        Ground-truth answer (one of the stream's candidate answers).
    skill : str | None
        Explicit skill label. When set it wins over the question parser (one-hot skill
        probabilities); easy-VQA samples leave it ``None`` so the parser gives soft
        probabilities.
    region : tuple[float, float, float, float] | None
        Normalised box ``(x0, y0, x1, y1)`` (0..1, origin top left) of the object the
        question is about, when the stream knows it (see ``fed_asr.data.regions``);
        ``None`` for questions about no single object or streams without boxes.
    """

    image: str
    question: str
    answer: str
    skill: str | None = None
    region: tuple[float, float, float, float] | None = None


@dataclass
class Stage:
    """One task of a continual stream: its training and test samples."""

    name: str
    train: list[VQASample]
    test: list[VQASample]


@dataclass
class ContinualStream:
    """An ordered list of stages sharing one answer set and one skill set.

    Parameters
    ----------
    name : str
        Stream name, e.g. ``"easyvqa/ability"``, ``"manifest:<folder>"`` or
        ``"scenes"``; engines report it in ``metrics.json``.
    stages : list[Stage]
        Stages in training order.
    answers : list[str]
        Candidate answers (sorted), scored at evaluation.
    skills : list[str]
        Skill names; column order of ``skill_probabilities``.
    extra_words : tuple[str, ...]
        Tokens added to the vocabulary beyond those of the stages' samples (e.g. every
        word of the source dataset), so that the vocabulary does not depend on the
        subsampling seed, the selected stages or the client partition.
    """

    name: str
    stages: list[Stage]
    answers: list[str]
    skills: list[str]
    extra_words: tuple[str, ...] = field(default=())

    def vocabulary(self) -> list[str]:
        """Sorted word-level vocabulary of the stream.

        Returns
        -------
        list[str]
            Every token (see ``tokenize``) of the questions and answers of all stages,
            of the candidate answers, of the caption samples and of ``extra_words``.
        """
        words: set[str] = set(CAPTION_WORDS) | set(self.extra_words)
        for answer in self.answers:
            words.update(tokenize(answer))
        for stage in self.stages:
            words.update(_sample_tokens(stage.train))
            words.update(_sample_tokens(stage.test))
        return sorted(words)

    def num_samples(self, split: str = "train") -> int:
        """Total number of samples of ``split`` (``"train"`` or ``"test"``)."""
        if split not in ("train", "test"):
            raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
        return sum(len(getattr(stage, split)) for stage in self.stages)


def _sample_tokens(samples: Sequence[VQASample]) -> set[str]:
    """Tokens of the questions and answers of ``samples`` (each distinct text once)."""
    texts = {s.question for s in samples} | {s.answer for s in samples}
    words: set[str] = set()
    for text in texts:
        words.update(tokenize(text))
    return words
