"""Continual VQA data: stream registry (easy-VQA, manifests, scenes), skills, splits."""

from fed_asr.data.easyvqa import caption_samples, easyvqa_stream, image_labels
from fed_asr.data.images import clear_image_cache, load_image
from fed_asr.data.manifest import manifest_stream, read_manifest
from fed_asr.data.objects import LabelledObject, ObjectImage
from fed_asr.data.partition import dirichlet_partition, partition_stream
from fed_asr.data.regions import grounding_share, region_mask, region_masks, sample_mask
from fed_asr.data.samples import (
    CAPTION_QUESTION,
    ContinualStream,
    Stage,
    VQASample,
    tokenize,
)
from fed_asr.data.scene_objects import scenes_objects
from fed_asr.data.scenes import SCENE_SKILLS, scenes_preparation, scenes_stream
from fed_asr.data.skills import (
    EASYVQA_SKILLS,
    parse_question,
    question_skill,
    skill_distribution,
    skill_probabilities,
)
from fed_asr.data.streams import (
    STREAMS,
    StreamEntry,
    build_stream,
    get_stream,
    register_stream,
    stream_objects,
    stream_preparation,
)

__all__ = [
    "CAPTION_QUESTION",
    "EASYVQA_SKILLS",
    "SCENE_SKILLS",
    "STREAMS",
    "ContinualStream",
    "LabelledObject",
    "ObjectImage",
    "Stage",
    "StreamEntry",
    "VQASample",
    "build_stream",
    "caption_samples",
    "clear_image_cache",
    "dirichlet_partition",
    "easyvqa_stream",
    "get_stream",
    "grounding_share",
    "image_labels",
    "load_image",
    "manifest_stream",
    "parse_question",
    "partition_stream",
    "question_skill",
    "read_manifest",
    "region_mask",
    "region_masks",
    "register_stream",
    "sample_mask",
    "scenes_objects",
    "scenes_preparation",
    "scenes_stream",
    "skill_distribution",
    "skill_probabilities",
    "stream_objects",
    "stream_preparation",
    "tokenize",
]
