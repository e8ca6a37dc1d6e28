"""The ``scenes`` stream: generated multi-object scenes, every skill in every stage.

Each 64x64 image holds 2-4 shapes (circle, square, triangle) of distinct colours
(``scene_render.COLORS``). One question per image, about one queried object:

- color: "what color is the <shape>?" (the shape is unique in the scene);
- shape: "what shape is the <color> object?";
- position: "is the <color> <shape> on the left or right?" / "... at the top or
  bottom?" (the object's centre is off the middle line);
- count: "how many shapes are there?" (two / three / four);
- existence: "is there a <color> <shape>?" (a "no" names a present colour or shape,
  so it needs binding).

Every stage holds every skill with balanced answers (the same answer set in every
stage); stages shift the visual statistics only (``STAGES``: large objects on plain
ground, small objects in noise and clutter, textured ground with distractor lines).
Samples carry their skill and the normalised box of the queried object (``region``;
``None`` for count and "no" existence questions). Images are rendered once into
``<cache_dir>/scenes/<set>-<hash>/`` (hash of the scene specs) and reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fed_asr.data.easyvqa import resolve_stage_order
from fed_asr.data.partition import make_rng
from fed_asr.data.samples import (
    CAPTION_QUESTION,
    ContinualStream,
    Stage,
    VQASample,
    tokenize,
)
from fed_asr.data.scene_render import (
    CANVAS,
    COLOR_NAMES,
    SHAPES,
    STYLES,
    Scene,
    SceneObject,
    render_scene,
)

FORMAT = 1  # bump when rendering changes, so cached images are redrawn
STAGES: tuple[str, ...] = ("plain", "clutter", "texture")
SCENE_SKILLS: tuple[str, ...] = ("color", "shape", "position", "count", "existence")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SKILL_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "position": ("left", "right", "top", "bottom"),
    "count": tuple(COUNT_WORDS.values()),
    "existence": ("yes", "no"),
}
DEFAULT_TRAIN_PER_STAGE = 2000
DEFAULT_TEST_PER_STAGE = 400
PREPARATION_STYLE = "base"
CAPTION_SHARE = 1 / 3  # of the preparation set; the rest are QA pairs of every skill
GAP = 2  # minimal free pixels between objects
MARGIN = 3  # minimal distance (px) of a position-queried centre from the middle
_DONE = ".complete"


def scene_words() -> tuple[str, ...]:
    """Every token of the scenes' questions, answers and captions (sorted)."""
    texts = [CAPTION_QUESTION, "shapes :", ","]
    for color in COLOR_NAMES:
        for shape in SHAPES:
            texts += _questions(color, shape)
    texts += [a for answers in SKILL_ANSWERS.values() for a in answers]
    return tuple(sorted({w for text in texts for w in tokenize(text)}))


def _questions(color: str, shape: str) -> list[str]:
    """Every question text naming ``color`` and/or ``shape``."""
    return [
        f"what color is the {shape}?",
        f"what shape is the {color} object?",
        f"is the {color} {shape} on the left or right?",
        f"is the {color} {shape} at the top or bottom?",
        "how many shapes are there?",
        f"is there a {color} {shape}?",
    ]


def _check_skills(skills: Sequence[str] | None) -> list[str]:
    """Validate a skill subset (``None`` -> every skill)."""
    if skills is None:
        return list(SCENE_SKILLS)
    if len(skills) == 0:
        raise ValueError("`data.skills` must name at least one skill, got [].")
    for skill in skills:
        if skill not in SCENE_SKILLS:
            raise ValueError(
                f"Unknown skill {skill!r} in `data.skills`. Available for scenes: "
                f"{list(SCENE_SKILLS)}."
            )
    return list(skills)


def balanced_plan(
    n: int, skills: Sequence[str], rng: np.random.Generator
) -> list[tuple[str, str]]:
    """``n`` (skill, answer) pairs: skills in turn, each skill's answers in turn.

    Every skill gets ``n / len(skills)`` items and, within a skill, every answer the
    same number up to one; the order is shuffled by ``rng``.
    """
    turns = {skill: 0 for skill in skills}
    plan = []
    for k in range(n):
        skill = skills[k % len(skills)]
        answers = SKILL_ANSWERS[skill]
        plan.append((skill, answers[turns[skill] % len(answers)]))
        turns[skill] += 1
    return [plan[i] for i in rng.permutation(n).tolist()]


def _place(
    sizes: Sequence[int], rng: np.random.Generator, first_side: str | None
) -> list[tuple[int, int, int, int]] | None:
    """Non-overlapping boxes of the given sides (the first one on ``first_side``)."""
    boxes: list[tuple[int, int, int, int]] = []
    half = CANVAS / 2
    for i, side in enumerate(sizes):
        for _ in range(60):
            x0, y0 = rng.integers(1, CANVAS - side, size=2).tolist()
            box = (x0, y0, x0 + side, y0 + side)
            cx, cy = x0 + side / 2, y0 + side / 2
            if i == 0 and first_side is not None:
                off = {"left": half - cx, "right": cx - half}
                off |= {"top": half - cy, "bottom": cy - half}
                if off[first_side] < MARGIN:
                    continue
            if all(
                box[0] >= b[2] + GAP
                or b[0] >= box[2] + GAP
                or box[1] >= b[3] + GAP
                or b[1] >= box[3] + GAP
                for b in boxes
            ):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def scene_for(
    skill: str, answer: str, style: str, rng: np.random.Generator
) -> tuple[Scene, str, tuple[float, float, float, float] | None]:
    """A scene, question and region whose answer is ``answer``."""
    n = {w: k for k, w in COUNT_WORDS.items()}[answer] if skill == "count" else 0
    n = n or int(rng.integers(2, 5))
    colors = [str(c) for c in rng.permutation(COLOR_NAMES)[:n]]
    shapes = [str(s) for s in rng.choice(SHAPES, size=n)]
    if skill == "color":
        others = [c for c in COLOR_NAMES if c != answer]
        colors = [answer] + [str(c) for c in rng.permutation(others)[: n - 1]]
        rest = [s for s in SHAPES if s != shapes[0]]  # queried shape stays unique
        shapes = shapes[:1] + [str(s) for s in rng.choice(rest, size=n - 1)]
    elif skill == "shape":
        shapes[0] = answer
    lo, hi = STYLES[style].size_range
    boxes = None
    while boxes is None:
        sides = rng.integers(lo, hi + 1, size=n).tolist()
        boxes = _place(sides, rng, answer if skill == "position" else None)
    objects = tuple(
        SceneObject(c, s, b) for c, s, b in zip(colors, shapes, boxes, strict=True)
    )
    scene = Scene(style, objects, int(rng.integers(2**31)))
    query = objects[0]
    region: tuple[float, float, float, float] | None = query.region
    if skill == "color":
        question = f"what color is the {query.shape}?"
    elif skill == "shape":
        question = f"what shape is the {query.color} object?"
    elif skill == "position":
        horizontal = answer in ("left", "right")
        axis = "on the left or right" if horizontal else "at the top or bottom"
        question = f"is the {query.color} {query.shape} {axis}?"
    elif skill == "count":
        question, region = "how many shapes are there?", None
    elif answer == "yes":
        question = f"is there a {query.color} {query.shape}?"
    else:
        present = {(o.color, o.shape) for o in objects}
        absent = sorted(
            (c, s)
            for c in COLOR_NAMES
            for s in SHAPES
            if (c, s) not in present and (c in colors or s in shapes)
        )
        color, shape = absent[int(rng.integers(len(absent)))]
        question, region = f"is there a {color} {shape}?", None
    return scene, question, region


def caption(scene: Scene) -> str:
    """Caption listing the objects left to right with colour, shape and position.

    E.g. ``"two shapes : red circle top left , blue square bottom right"``.
    """
    parts = []
    for obj in sorted(scene.objects, key=lambda o: o.center):
        cx, cy = obj.center
        vertical = "top" if cy < CANVAS / 2 else "bottom"
        horizontal = "left" if cx < CANVAS / 2 else "right"
        parts.append(f"{obj.color} {obj.shape} {vertical} {horizontal}")
    return f"{COUNT_WORDS[len(scene.objects)]} shapes : " + " , ".join(parts)


def materialise_scenes(
    scenes: Sequence[Scene], cache_dir: str | Path, tag: str
) -> list[str]:
    """Render ``scenes`` once into a folder named by their hash; return the paths."""
    digest = hashlib.sha256(repr((FORMAT, tuple(scenes))).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() / "scenes"
    folder = root / f"{tag}-{digest}"
    paths = [str(folder / f"{i:05d}.png") for i in range(len(scenes))]
    if (folder / _DONE).is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        for i, scene in enumerate(scenes):
            render_scene(scene).save(tmp / f"{i:05d}.png")
        (tmp / _DONE).touch()
        if folder.exists() and not (folder / _DONE).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a partial folder, never ours
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed the same content first
            if not (folder / _DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


# (scene, question, answer, skill, region); captions have no skill
_Item = tuple[Scene, str, str, str | None, tuple[float, float, float, float] | None]


def _generate(
    style: str,
    plan: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    exclude: frozenset[tuple[SceneObject, ...]] = frozenset(),
) -> list[_Item]:
    """(scene, question, answer, skill, region) for every planned (skill, answer)."""
    items: list[_Item] = []
    for skill, answer in plan:
        scene, question, region = scene_for(skill, answer, style, rng)
        while scene.objects in exclude:  # never a training layout in the test set
            scene, question, region = scene_for(skill, answer, style, rng)
        items.append((scene, question, answer, skill, region))
    return items


def _to_samples(
    items: Sequence[_Item], cache_dir: str | Path, tag: str
) -> list[VQASample]:
    """Render the items' scenes and pair them with their questions."""
    paths = materialise_scenes([it[0] for it in items], cache_dir, tag)
    return [
        VQASample(path, question, answer, skill, region)
        for path, (_, question, answer, skill, region) in zip(paths, items, strict=True)
    ]


def _size(value: int | None, default: int, name: str) -> int:
    """A per-stage size (``None`` -> ``default``), checked positive."""
    size = default if value is None else value
    if size <= 0:
        raise ValueError(f"`data.{name}` must be positive, got {size}.")
    return size


def scenes_stream(
    *,
    stage_order: Sequence[str] | None = None,
    max_train_per_stage: int | None = None,
    max_test_per_stage: int | None = None,
    skills: Sequence[str] | None = None,
    seed: int = 0,
    cache_dir: str | Path = "~/.cache/fed_asr",
) -> ContinualStream:
    """Build the ``scenes`` continual stream (see the module docstring).

    Parameters
    ----------
    stage_order : Sequence[str] | None
        Stages to use, in order (of ``STAGES``); ``None`` uses ``STAGES``.
    max_train_per_stage, max_test_per_stage : int | None
        Samples (= images) generated per stage; ``None`` uses
        ``DEFAULT_TRAIN_PER_STAGE`` / ``DEFAULT_TEST_PER_STAGE``.
    skills : Sequence[str] | None
        Skills to ask (a subset of ``SCENE_SKILLS``); ``None`` asks every skill.
    seed : int
        Generation seed; a stage's samples depend only on the seed, stage, sizes and
        skills (not on the other stages). Train and test use different generators,
        and a test scene never repeats a training layout.
    cache_dir : str | Path
        Rendered images go under ``<cache_dir>/scenes/``.

    Returns
    -------
    ContinualStream
        Named ``"scenes"``; answers are the sorted answers of the chosen skills.

    Raises
    ------
    ValueError
        Unknown stage or skill, or a non-positive size.
    """
    order = resolve_stage_order(STAGES, STAGES, stage_order)
    skill_list = _check_skills(skills)
    n_train = _size(max_train_per_stage, DEFAULT_TRAIN_PER_STAGE, "max_train_per_stage")
    n_test = _size(max_test_per_stage, DEFAULT_TEST_PER_STAGE, "max_test_per_stage")
    stages = []
    for name in order:
        rng = make_rng(seed, "scenes", name, "train")
        train = _generate(name, balanced_plan(n_train, skill_list, rng), rng)
        seen = frozenset(item[0].objects for item in train)
        rng = make_rng(seed, "scenes", name, "test")
        test = _generate(name, balanced_plan(n_test, skill_list, rng), rng, seen)
        stages.append(
            Stage(
                name,
                _to_samples(train, cache_dir, f"{name}-train"),
                _to_samples(test, cache_dir, f"{name}-test"),
            )
        )
    return ContinualStream(
        name="scenes",
        stages=stages,
        answers=sorted({a for s in skill_list for a in SKILL_ANSWERS[s]}),
        skills=skill_list,
        extra_words=scene_words(),
    )


def scenes_preparation(
    n: int,
    seed: int = 0,
    *,
    cache_dir: str | Path = "~/.cache/fed_asr",
    skills: Sequence[str] | None = None,
    style: str = PREPARATION_STYLE,
    caption_share: float = CAPTION_SHARE,
) -> list[VQASample]:
    """Base-model preparation set: scene captions plus QA pairs of every skill.

    Parameters
    ----------
    n : int
        Number of samples (one image each).
    seed : int
        Generation seed (its generator is not any stage's, so the images differ from
        the stream's test images).
    cache_dir : str | Path
        Rendered images go under ``<cache_dir>/scenes/``.
    skills : Sequence[str] | None
        Skills of the QA pairs (``None``: all); every answer of each is covered.
    style : str
        Visual style (``"base"``: plain background, every object size of the stages,
        no clutter, noise or texture).
    caption_share : float
        Fraction of caption samples (``question="caption"``, answer from
        ``caption``); the rest are balanced QA pairs.

    Returns
    -------
    list[VQASample]
        Samples in random order; QA pairs carry skill and region as in the stream.

    Raises
    ------
    ValueError
        Non-positive ``n``, ``caption_share`` outside [0, 1], unknown skill or style.
    """
    if n <= 0:
        raise ValueError(f"`n` must be positive, got {n}.")
    if not 0.0 <= caption_share <= 1.0:
        raise ValueError(f"`caption_share` must be in [0, 1], got {caption_share}.")
    if style not in STYLES:
        raise ValueError(f"Unknown `style` {style!r}. Available: {sorted(STYLES)}.")
    skill_list = _check_skills(skills)
    rng = make_rng(seed, "scenes", "preparation", style)
    n_caption = round(n * caption_share)
    items = _generate(style, balanced_plan(n - n_caption, skill_list, rng), rng)
    for _ in range(n_caption):
        count = COUNT_WORDS[int(rng.integers(2, 5))]
        scene, _, _ = scene_for("count", count, style, rng)
        items.append((scene, CAPTION_QUESTION, caption(scene), None, None))
    order = rng.permutation(len(items)).tolist()
    return _to_samples([items[i] for i in order], cache_dir, f"preparation-{style}")
