"""Continual streams from a folder of JSONL manifests.

Layout of the folder::

    stage_0_train.jsonl  stage_0_test.jsonl
    stage_1_train.jsonl  stage_1_test.jsonl
    ...
    stages.json          (optional) JSON list of stage names, one per stage

One row per line: ``{"image": path relative to the folder, "question": str,
"answer": str, "skill": str (optional)}``. Blank lines are skipped. Files are UTF-8;
image paths must stay inside the folder; every image is decoded once at load; every
stage needs at least one train and one test row; a stage index may appear only once
(``stage_0`` and ``stage_00`` together are refused). Every problem is reported with
the file and line it comes from, before any training starts
(``fed_asr.data.manifest_checks``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from fed_asr.data.easyvqa import resolve_stage_order
from fed_asr.data.manifest_checks import (
    check_image,
    confined_image_path,
    numbered_lines,
)
from fed_asr.data.partition import make_rng, stratified_subsample
from fed_asr.data.samples import ContinualStream, Stage, VQASample, tokenize
from fed_asr.data.skills import EASYVQA_SKILLS, parse_question

_STAGE_FILE = re.compile(r"^stage_(\d+)_(train|test)\.jsonl$")
_REQUIRED = ("image", "question", "answer")
_OPTIONAL = ("skill",)


def read_manifest(path: str | Path, root: str | Path | None = None) -> list[VQASample]:
    """Read one JSONL manifest file.

    Parameters
    ----------
    path : str | Path
        The ``.jsonl`` file.
    root : str | Path | None
        Folder that relative image paths start from; ``None`` uses the file's folder.

    Returns
    -------
    list[VQASample]
        One sample per non-blank line, image paths resolved against ``root``.

    Raises
    ------
    FileNotFoundError
        The manifest, or the image of a row (message ``"<file>:<line>: ..."``).
    ValueError
        A line that is not UTF-8 or not a JSON object, a missing field or a field of
        the wrong type, an image path outside the folder or an image that does not
        decode (message ``"<file>:<line>: ..."``).
    """
    return [sample for _, sample in _read_lines(Path(path), root)]


def _read_lines(path: Path, root: str | Path | None) -> list[tuple[int, VQASample]]:
    """(line number, sample) of every row of a manifest (see ``read_manifest``)."""
    base = path.parent if root is None else Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest file not found: {str(path)!r}.")
    samples: list[tuple[int, VQASample]] = []
    unknown: set[str] = set()
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{where}: a row must be a JSON object, got {type(row).__name__}."
            )
        for key in _REQUIRED:
            if key not in row:
                raise ValueError(f"{where}: missing field `{key}`.")
        for key in _REQUIRED + _OPTIONAL:
            value = row.get(key)
            if key in _OPTIONAL and value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where}: field `{key}` must be a non-empty string, got {value!r}."
                )
        unknown.update(set(row) - set(_REQUIRED + _OPTIONAL))
        image = confined_image_path(base, row["image"], where)
        check_image(image, where)
        sample = VQASample(str(image), row["question"], row["answer"], row.get("skill"))
        samples.append((number, sample))
    if unknown:
        warnings.warn(
            f"{path}: fields {sorted(unknown)} specified but will be ignored; rows "
            f"use only {list(_REQUIRED + _OPTIONAL)}.",
            stacklevel=2,
        )
    return samples


def _stage_files(root: Path) -> list[tuple[Path, Path]]:
    """(train, test) manifest of every stage, checking that stages are contiguous."""
    if not root.is_dir():
        raise FileNotFoundError(f"Manifest folder not found: {str(root)!r}.")
    found: dict[int, dict[str, Path]] = {}
    for entry in sorted(root.iterdir()):
        match = _STAGE_FILE.match(entry.name)
        if match:
            index, split = int(match.group(1)), match.group(2)
            other = found.setdefault(index, {}).get(split)
            if other is not None:
                raise ValueError(
                    f"{root}: {other.name!r} and {entry.name!r} are both the {split} "
                    f"manifest of stage {index}; keep one."
                )
            found[index][split] = entry
    if not found:
        raise FileNotFoundError(
            f"No stage manifests in {str(root)!r}: expected stage_0_train.jsonl and "
            "stage_0_test.jsonl, stage_1_..., etc."
        )
    files = []
    for k in range(max(found) + 1):
        if k not in found:
            raise FileNotFoundError(
                f"Stage indices in {str(root)!r} must be contiguous from 0: stage {k} "
                f"is missing but stage {max(found)} exists."
            )
        for split in ("train", "test"):
            if split not in found[k]:
                raise FileNotFoundError(
                    f"Missing {str(root / f'stage_{k}_{split}.jsonl')!r} for stage {k}."
                )
        files.append((found[k]["train"], found[k]["test"]))
    return files


def _stage_names(root: Path, num_stages: int) -> list[str]:
    """Names from ``stages.json`` if present, else ``stage_<k>``."""
    path = root / "stages.json"
    if not path.exists():
        return [f"stage_{k}" for k in range(num_stages)]
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg}).") from err
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"{path}: must hold a list of distinct non-empty stage names, got "
            f"{names!r}."
        )
    if len(names) != num_stages:
        raise ValueError(
            f"{path}: names {len(names)} stages but the folder has {num_stages}."
        )
    return names


def _check_skills(
    path: Path, rows: Sequence[tuple[int, VQASample]], skills: Sequence[str]
) -> None:
    """Each row's explicit or parsed skill must be one of ``skills``."""
    for number, sample in rows:
        if sample.skill is not None:
            skill = sample.skill
        else:
            try:
                skill = parse_question(sample.question).skill
            except ValueError as err:
                raise ValueError(
                    f"{path}:{number}: no `skill` field and the question "
                    f"{sample.question!r} matches no known template."
                ) from err
        if skill not in skills:
            raise ValueError(
                f"{path}:{number}: skill {skill!r} is not one of the stream's "
                f"skills {list(skills)}."
            )


def manifest_stream(
    root: str | Path,
    *,
    stage_order: Sequence[str] | None = None,
    max_train_per_stage: int | None = None,
    max_test_per_stage: int | None = None,
    skills: Sequence[str] | None = None,
    seed: int = 0,
) -> ContinualStream:
    """Build a continual stream from a manifest folder (see the module docstring).

    Parameters
    ----------
    root : str | Path
        The folder.
    stage_order : Sequence[str] | None
        Stage names to use, in order; ``None`` keeps the folder's order.
    max_train_per_stage, max_test_per_stage : int | None
        Sizes of the answer-stratified random subsets per stage; ``None`` keeps all.
    skills : Sequence[str] | None
        Skill set. ``None``: the sorted ``skill`` values of the rows if any row has
        one, else the easy-VQA parser's skills (every question must parse).
    seed : int
        Subsampling seed.

    Returns
    -------
    ContinualStream
        Answers are the sorted answers of all rows of all files.

    Raises
    ------
    FileNotFoundError
        Missing folder, stage file or image.
    ValueError
        A malformed row, ``stages.json`` or ``stage_order``, a row whose skill is not
        in the skill set, an empty stage file or two files of one stage.
    """
    root = Path(root).expanduser()
    files = _stage_files(root)
    names = _stage_names(root, len(files))
    # every file is checked, even those of stages left out by `stage_order`
    rows = {path: _read_lines(path, root) for pair in files for path in pair}
    for path, numbered in rows.items():
        if not numbered:
            raise ValueError(
                f"{path}:1: the file has no rows; every stage needs at least one "
                "train and one test row."
            )
    everything = [s for numbered in rows.values() for _, s in numbered]
    if skills is not None:
        skill_list = list(skills)
    else:
        explicit = sorted({s.skill for s in everything if s.skill is not None})
        skill_list = explicit or list(EASYVQA_SKILLS)
    for path, numbered in rows.items():
        _check_skills(path, numbered, skill_list)
    order = resolve_stage_order(names, names, stage_order)
    stages = []
    for name in order:
        k = names.index(name)
        split_samples = []
        for split, path, max_size in (
            ("train", files[k][0], max_train_per_stage),
            ("test", files[k][1], max_test_per_stage),
        ):
            samples = [sample for _, sample in rows[path]]
            rng = make_rng(seed, "manifest", name, split)
            keep = stratified_subsample([s.answer for s in samples], max_size, rng)
            split_samples.append([samples[i] for i in keep])
        stages.append(Stage(name, split_samples[0], split_samples[1]))
    texts = {s.question for s in everything} | {s.answer for s in everything}
    words = {w for text in texts for w in tokenize(text)}
    return ContinualStream(
        name=f"manifest:{root.name}",
        stages=stages,
        answers=sorted({s.answer for s in everything}),
        skills=skill_list,
        extra_words=tuple(sorted(words)),
    )
