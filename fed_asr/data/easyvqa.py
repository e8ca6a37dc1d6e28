"""easy-VQA continual streams from the installed ``easy_vqa`` package.

Two streams:

- ``ability``: one question type per stage (default order shape, color, existence;
  ``negated_existence`` is available as a stage name);
- ``domain``: one drawn shape per stage (circle, rectangle, triangle), every question
  type in every stage.

The package does not store the colour and shape of an image; they are derived from its
questions (``image_labels``). Images whose shape cannot be derived are left out of the
domain stream (about 4% of them) and images without both labels out of the captions.
Samples keep ``skill=None`` so that ``skill_probabilities`` uses the soft parser.
Every image shows one shape on a plain background, so every question is about that
shape: samples carry its box (``region``, read from the pixels), which gives the
grounding share of the drift rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

from fed_asr.data.images import foreground_box
from fed_asr.data.partition import make_rng, stratified_subsample
from fed_asr.data.samples import (
    CAPTION_QUESTION,
    EASYVQA_COLORS,
    EASYVQA_SHAPES,
    ContinualStream,
    Stage,
    VQASample,
    tokenize,
)
from fed_asr.data.skills import EASYVQA_SKILLS, parse_question

STREAM_STAGES: dict[str, tuple[str, ...]] = {
    "ability": EASYVQA_SKILLS,
    "domain": EASYVQA_SHAPES,
}
DEFAULT_STAGE_ORDER: dict[str, tuple[str, ...]] = {
    "ability": ("shape", "color", "existence"),
    "domain": EASYVQA_SHAPES,
}
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageLabel:
    """Colour and shape of one easy-VQA image (``None`` when not derivable)."""

    color: str | None
    shape: str | None


@dataclass(frozen=True)
class _Record:
    sample: VQASample
    skill: str
    image_id: int


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {list(_SPLITS)}, got {split!r}.")


@cache
def easyvqa_answers() -> tuple[str, ...]:
    """Return the 13 easy-VQA answers, sorted."""
    import easy_vqa

    return tuple(sorted(easy_vqa.get_answers()))


@cache
def _records(split: str) -> tuple[_Record, ...]:
    """Every question of ``split`` as a sample with its parsed type (read once)."""
    import easy_vqa

    _check_split(split)
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    records = []
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        if image_id not in paths:
            raise ValueError(f"easy-VQA {split} image {image_id} has no image file.")
        sample = VQASample(image=str(paths[image_id]), question=text, answer=answer)
        records.append(_Record(sample, parse_question(text).skill, int(image_id)))
    return tuple(records)


@cache
def image_labels(split: str) -> dict[int, ImageLabel]:
    """Colour and shape of every image of ``split``, derived from its questions.

    Open questions give a label directly ("what color is the circle?" -> red: colour
    red, shape circle). Yes/no questions give it when the named attribute is present,
    or rule it out when absent; an attribute with all but one value ruled out is the
    remaining value.

    Parameters
    ----------
    split : str
        ``"train"`` or ``"test"``.

    Returns
    -------
    dict[int, ImageLabel]
        Image id -> label; a field is ``None`` when the questions do not determine it.

    Raises
    ------
    ValueError
        The questions of an image contradict each other.
    """
    kinds = {"color": EASYVQA_COLORS, "shape": EASYVQA_SHAPES}
    known: dict[int, dict[str, str]] = {}
    ruled_out: dict[int, dict[str, set[str]]] = {}
    for rec in _records(split):
        parsed = parse_question(rec.sample.question)
        pos = known.setdefault(rec.image_id, {})
        neg = ruled_out.setdefault(rec.image_id, {"color": set(), "shape": set()})
        facts: list[tuple[str, str, bool]] = []
        named = [("color", w) for w in parsed.colors] + [
            ("shape", w) for w in parsed.shapes
        ]
        if parsed.skill in ("shape", "color"):
            facts.append((parsed.skill, rec.sample.answer, True))
            facts += [(kind, word, True) for kind, word in named]
        else:
            present = (rec.sample.answer == "yes") != (
                parsed.skill == "negated_existence"
            )
            facts += [(kind, word, present) for kind, word in named]
        for kind, word, holds in facts:
            if not holds:
                neg[kind].add(word)
            elif pos.setdefault(kind, word) != word:
                raise ValueError(
                    f"easy-VQA {split} image {rec.image_id}: questions give both "
                    f"{pos[kind]!r} and {word!r} as its {kind}."
                )
    labels = {}
    for image_id, pos in known.items():
        for kind, values in kinds.items():
            left = set(values) - ruled_out[image_id][kind]
            if kind in pos and pos[kind] not in left:
                raise ValueError(
                    f"easy-VQA {split} image {image_id}: {kind} {pos[kind]!r} is both "
                    "stated and ruled out by its questions."
                )
            if kind not in pos and len(left) == 1:
                pos[kind] = left.pop()
        labels[image_id] = ImageLabel(pos.get("color"), pos.get("shape"))
    return labels


@cache
def easyvqa_words() -> tuple[str, ...]:
    """Every token of the easy-VQA questions and answers (independent of the seed)."""
    words = {w for a in easyvqa_answers() for w in tokenize(a)}
    for split in _SPLITS:
        for text in {rec.sample.question for rec in _records(split)}:
            words.update(tokenize(text))
    return tuple(sorted(words))


def resolve_stage_order(
    available: Sequence[str], default: Sequence[str], order: Sequence[str] | None
) -> list[str]:
    """Validate a requested stage order (``None`` -> ``default``).

    Raises
    ------
    ValueError
        Empty order, a duplicate, or an unknown stage name (the choices are listed).
    """
    if order is None:
        return list(default)
    if len(order) == 0:
        raise ValueError("`data.stage_order` must name at least one stage, got [].")
    for name in order:
        if name not in available:
            raise ValueError(
                f"Unknown stage {name!r} in `data.stage_order`. Available: "
                f"{list(available)}."
            )
    if len(set(order)) != len(order):
        raise ValueError(f"`data.stage_order` names a stage twice: {list(order)}.")
    return list(order)


def _stage_samples(
    stream: str, stage: str, split: str, max_size: int | None, seed: int
) -> list[VQASample]:
    """Select the (subsampled, shuffled) samples of one stage and split."""
    if stream == "ability":
        records = [r for r in _records(split) if r.skill == stage]
    else:
        labels = image_labels(split)
        records = [r for r in _records(split) if labels[r.image_id].shape == stage]
    rng = make_rng(seed, "easyvqa", stream, stage, split)
    keep = stratified_subsample([r.sample.answer for r in records], max_size, rng)
    return [_with_region(records[i].sample) for i in keep]


def _with_region(sample: VQASample) -> VQASample:
    """The sample with its image's shape box as ``region`` (the question's object)."""
    return replace(sample, region=foreground_box(sample.image))


def easyvqa_stream(
    stream: str = "ability",
    *,
    stage_order: Sequence[str] | None = None,
    max_train_per_stage: int | None = None,
    max_test_per_stage: int | None = None,
    skills: Sequence[str] | None = None,
    seed: int = 0,
) -> ContinualStream:
    """Build an easy-VQA continual stream.

    Parameters
    ----------
    stream : str
        ``"ability"`` or ``"domain"``.
    stage_order : Sequence[str] | None
        Stages to use, in order; ``None`` uses ``DEFAULT_STAGE_ORDER[stream]``.
    max_train_per_stage, max_test_per_stage : int | None
        Per-stage sizes of the answer-stratified random subsets of the package's train
        and test splits; ``None`` keeps every sample.
    skills : Sequence[str] | None
        Skill set (a reordering or subset of ``EASYVQA_SKILLS`` that covers every
        question type of the chosen stages); ``None`` uses ``EASYVQA_SKILLS``.
    seed : int
        Subsampling seed; the same seed gives the same samples in the same order.

    Returns
    -------
    ContinualStream
        Answers are the 13 easy-VQA answers (sorted).

    Raises
    ------
    ValueError
        Unknown ``stream``, stage name or skill, or skills that miss a question type.
    """
    if stream not in STREAM_STAGES:
        raise ValueError(
            f"`data.stream` must be one of {sorted(STREAM_STAGES)}, got {stream!r}."
        )
    order = resolve_stage_order(
        STREAM_STAGES[stream], DEFAULT_STAGE_ORDER[stream], stage_order
    )
    stages = [
        Stage(
            name=name,
            train=_stage_samples(stream, name, "train", max_train_per_stage, seed),
            test=_stage_samples(stream, name, "test", max_test_per_stage, seed),
        )
        for name in order
    ]
    skill_list = list(EASYVQA_SKILLS) if skills is None else list(skills)
    for skill in skill_list:
        if skill not in EASYVQA_SKILLS:
            raise ValueError(
                f"Unknown skill {skill!r} in `data.skills`. Available for easy-VQA: "
                f"{list(EASYVQA_SKILLS)}."
            )
    used = {
        parse_question(s.question).skill for st in stages for s in st.train + st.test
    }
    missing = sorted(used - set(skill_list))
    if missing:
        raise ValueError(
            f"`data.skills` {skill_list} misses question types {missing} of the "
            f"selected stages {order}."
        )
    return ContinualStream(
        name=f"easyvqa/{stream}",
        stages=stages,
        answers=list(easyvqa_answers()),
        skills=skill_list,
        extra_words=easyvqa_words(),
    )


def caption_samples(max_images: int, seed: int) -> list[VQASample]:
    """Caption samples of easy-VQA training images, for base-model preparation.

    Parameters
    ----------
    max_images : int
        Number of images (capped at the training images with a known colour and shape,
        about 3,500).
    seed : int
        Seed of the deterministic image subset.

    Returns
    -------
    list[VQASample]
        ``VQASample(image, question="caption", answer="<color> <shape>")``, one per
        image, in random order. Test images are never used.
    """
    if max_images <= 0:
        raise ValueError(f"`max_images` must be positive, got {max_images}.")
    labels = image_labels("train")
    paths = {r.image_id: r.sample.image for r in _records("train")}
    ids = sorted(
        i
        for i, label in labels.items()
        if label.color is not None and label.shape is not None
    )
    rng = make_rng(seed, "caption")
    chosen = rng.permutation(len(ids))[:max_images]
    return [
        VQASample(
            image=paths[ids[k]],
            question=CAPTION_QUESTION,
            answer=f"{labels[ids[k]].color} {labels[ids[k]].shape}",
        )
        for k in chosen.tolist()
    ]
