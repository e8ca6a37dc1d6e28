"""Registry of continual streams: ``data.stream`` picks one by name.

A stream is a plug-in: one module with a builder ``(DataConfig, seed) ->
ContinualStream`` and one ``register_stream`` line (below for the built-in ones, or
in any module imported before the config is validated)::

    register_stream("scenes", build_scenes_stream, preparation=scenes_preparation,
                    objects=scenes_objects)

``DataConfig.__post_init__`` validates ``data.stream`` against this registry, and
``data.name`` is the stream's ``source`` (e.g. ``easyvqa`` for ``ability`` and
``domain``), filled in when not given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fed_asr.config import DataConfig
from fed_asr.data.easyvqa import caption_samples, easyvqa_stream
from fed_asr.data.images import foreground_box
from fed_asr.data.manifest import manifest_stream
from fed_asr.data.objects import LabelledObject, ObjectImage
from fed_asr.data.samples import ContinualStream, VQASample
from fed_asr.data.scene_objects import scenes_objects
from fed_asr.data.scenes import PREPARATION_STYLE, scenes_preparation, scenes_stream
from fed_asr.registry import SNAKE_CASE, check_new_name, lookup

StreamBuilder = Callable[[DataConfig, int], ContinualStream]
# (number of samples, seed, data config) -> base-model preparation samples
PreparationBuilder = Callable[[int, int, DataConfig], list[VQASample]]
# (number of images, seed, data config, styles) -> images with labelled objects;
# styles: "all" visual conditions of the stream or the preparation's "base" ones
ObjectsBuilder = Callable[[int, int, DataConfig, str], list[ObjectImage]]


@dataclass(frozen=True)
class StreamEntry:
    """A registered stream.

    Parameters
    ----------
    name : str
        Registry key (``data.stream``).
    build : StreamBuilder
        ``(cfg, seed) -> ContinualStream``.
    source : str
        Data source (``data.name``); several streams may share one.
    needs_root : bool
        ``data.root`` must be set.
    preparation : PreparationBuilder | None
        The stream's own base-model preparation set (``model.pretrain_data=stream``),
        ``(n, seed, cfg) -> samples``; ``None`` when it has none.
    objects : ObjectsBuilder | None
        Images with labelled objects for the vision tower's preparation
        (``model.pretrain_vision_steps``), ``(n, seed, cfg, styles) -> images``
        (``styles``: ``model.pretrain_vision_styles``); ``None`` when the stream
        does not know what its images show.
    """

    name: str
    build: StreamBuilder
    source: str
    needs_root: bool = False
    preparation: PreparationBuilder | None = None
    objects: ObjectsBuilder | None = None


STREAMS: dict[str, StreamEntry] = {}


def register_stream(
    name: str,
    builder: StreamBuilder,
    *,
    source: str | None = None,
    needs_root: bool = False,
    preparation: PreparationBuilder | None = None,
    objects: ObjectsBuilder | None = None,
) -> StreamEntry:
    """Register a continual stream under ``name``.

    Parameters
    ----------
    name : str
        Unique snake_case name, used as ``data.stream``.
    builder : StreamBuilder
        Builds the full (not partitioned) stream from the data config and seed.
    source : str | None
        ``data.name`` of the stream; ``name`` when None.
    needs_root : bool
        Whether the stream reads ``data.root``.
    preparation : PreparationBuilder | None
        Optional base-model preparation set of the stream.
    objects : ObjectsBuilder | None
        Optional labelled-object images of the stream (vision tower preparation).

    Returns
    -------
    StreamEntry
        The registered entry.

    Raises
    ------
    ValueError
        ``name`` or ``source`` is not snake_case.
    KeyError
        ``name`` is already registered.
    """
    source = name if source is None else source
    if not SNAKE_CASE.match(source):
        raise ValueError(f"Stream sources are snake_case, got {source!r}.")
    check_new_name(STREAMS, name, "stream")
    entry = StreamEntry(name, builder, source, needs_root, preparation, objects)
    STREAMS[name] = entry
    return entry


def get_stream(name: str) -> StreamEntry:
    """Return the entry of stream ``name``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the registered streams.
    """
    return lookup(STREAMS, name, "stream")


def stream_sources() -> list[str]:
    """Sorted distinct sources (valid ``data.name`` values)."""
    return sorted({entry.source for entry in STREAMS.values()})


def build_stream(cfg: DataConfig, seed: int) -> ContinualStream:
    """Build the continual stream named by ``cfg.stream``.

    Parameters
    ----------
    cfg : DataConfig
        ``stream`` picks the registered builder; ``stage_order``, ``skills`` and the
        per-stage maxima apply to every stream, ``root`` to manifests.
    seed : int
        Subsampling / generation seed (the experiment seed).

    Returns
    -------
    ContinualStream
        The full (not yet partitioned) stream; its ``name`` identifies it in metrics.

    Raises
    ------
    KeyError
        Unknown ``cfg.stream``.
    ValueError
        Unknown stage, or invalid skills / manifest rows.
    FileNotFoundError
        Missing manifest folder, file or image.
    """
    return get_stream(cfg.stream).build(cfg, seed)


def _streams_providing(builder: str) -> list[str]:
    """Sorted names of the streams whose optional ``builder`` field is set."""
    return sorted(n for n, e in STREAMS.items() if getattr(e, builder) is not None)


def stream_preparation(cfg: DataConfig, num_samples: int, seed: int) -> list[VQASample]:
    """Base-model preparation samples of the stream ``cfg.stream``.

    Parameters
    ----------
    cfg : DataConfig
        The run's data config.
    num_samples : int
        Number of samples wanted.
    seed : int
        Seed of the (deterministic) set.

    Returns
    -------
    list[VQASample]
        Samples whose images are disjoint from the stream's test images.

    Raises
    ------
    ValueError
        The stream provides no preparation set.
    """
    entry = get_stream(cfg.stream)
    if entry.preparation is None:
        raise ValueError(
            f"Stream {cfg.stream!r} has no preparation set for "
            "`model.pretrain_data='stream'`; streams with one: "
            f"{_streams_providing('preparation')}."
        )
    return entry.preparation(num_samples, seed, cfg)


def stream_objects(
    cfg: DataConfig, num_images: int, seed: int, styles: str = "all"
) -> list[ObjectImage]:
    """Labelled-object images of the stream ``cfg.stream`` (vision preparation).

    ``styles`` is ``model.pretrain_vision_styles``: ``"all"`` visual conditions of
    the stream or only those of its ``"base"`` preparation set.

    Raises
    ------
    ValueError
        The stream does not provide labelled objects; the message names
        ``model.pretrain_vision_steps`` and the streams that do.
    """
    entry = get_stream(cfg.stream)
    if entry.objects is None:
        raise ValueError(
            f"`model.pretrain_vision_steps` > 0 needs images with labelled objects, "
            f"and stream {cfg.stream!r} has none; streams with them: "
            f"{_streams_providing('objects')}. "
            "Set `model.pretrain_vision_steps=0` (or use a pre-trained checkpoint)."
        )
    return entry.objects(num_images, seed, cfg, styles)


def _common(cfg: DataConfig, seed: int) -> dict[str, object]:
    """Keyword arguments every built-in builder takes."""
    return {
        "stage_order": cfg.stage_order,
        "max_train_per_stage": cfg.max_train_per_stage,
        "max_test_per_stage": cfg.max_test_per_stage,
        "skills": cfg.skills,
        "seed": seed,
    }


def _build_ability(cfg: DataConfig, seed: int) -> ContinualStream:
    """easy-VQA, one question type per stage."""
    return easyvqa_stream("ability", **_common(cfg, seed))  # type: ignore[arg-type]


def _build_domain(cfg: DataConfig, seed: int) -> ContinualStream:
    """easy-VQA, one drawn shape per stage."""
    return easyvqa_stream("domain", **_common(cfg, seed))  # type: ignore[arg-type]


def _build_manifest(cfg: DataConfig, seed: int) -> ContinualStream:
    """JSONL manifest folder ``cfg.root``."""
    if not cfg.root:
        raise ValueError("`data.root` is required when `data.stream='manifest'`.")
    return manifest_stream(cfg.root, **_common(cfg, seed))  # type: ignore[arg-type]


def _build_scenes(cfg: DataConfig, seed: int) -> ContinualStream:
    """Generated multi-object scenes, images under ``cfg.cache_dir``."""
    return scenes_stream(cache_dir=cfg.cache_dir, **_common(cfg, seed))  # type: ignore[arg-type]


def _easyvqa_captions(n: int, seed: int, cfg: DataConfig) -> list[VQASample]:
    """easy-VQA caption samples (training images only)."""
    return caption_samples(n, seed)


def _easyvqa_objects(
    n: int, seed: int, cfg: DataConfig, styles: str
) -> list[ObjectImage]:
    """easy-VQA training images with their one shape's colour, shape and box.

    Colour and shape come from the image's questions (``caption_samples``), the box
    from its pixels (``foreground_box``). easy-VQA has one visual style, so ``styles``
    changes nothing.
    """
    items = []
    for sample in caption_samples(n, seed):
        box = foreground_box(sample.image)
        if box is None:
            continue
        color, shape = sample.answer.split(" ", 1)
        labels = (("color", color), ("shape", shape))
        items.append(ObjectImage(sample.image, (LabelledObject(box, labels),)))
    return items


def _scenes_preparation(n: int, seed: int, cfg: DataConfig) -> list[VQASample]:
    """Scene captions and QA pairs in the neutral base style."""
    return scenes_preparation(n, seed, cache_dir=cfg.cache_dir, skills=cfg.skills)


for _name, _builder in (("ability", _build_ability), ("domain", _build_domain)):
    register_stream(
        _name,
        _builder,
        source="easyvqa",
        preparation=_easyvqa_captions,
        objects=_easyvqa_objects,
    )
register_stream("manifest", _build_manifest, needs_root=True)


def _scenes_objects(
    n: int, seed: int, cfg: DataConfig, styles: str
) -> list[ObjectImage]:
    """Scene images (every style, or the preparation's) with labelled objects."""
    chosen = None if styles == "all" else [PREPARATION_STYLE]
    return scenes_objects(n, seed, cache_dir=cfg.cache_dir, styles=chosen)


register_stream(
    "scenes", _build_scenes, preparation=_scenes_preparation, objects=_scenes_objects
)
