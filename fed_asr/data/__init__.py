"""Continual VQA data: easy-VQA and JSONL manifest streams, skills, partitioning."""

from fed_asr.data.easyvqa import caption_samples, easyvqa_stream, image_labels
from fed_asr.data.images import clear_image_cache, load_image
from fed_asr.data.manifest import manifest_stream, read_manifest
from fed_asr.data.partition import dirichlet_partition, partition_stream
from fed_asr.data.samples import (
    CAPTION_QUESTION,
    ContinualStream,
    Stage,
    VQASample,
    tokenize,
)
from fed_asr.data.skills import (
    EASYVQA_SKILLS,
    parse_question,
    question_skill,
    skill_distribution,
    skill_probabilities,
)
from fed_asr.data.streams import build_stream

__all__ = [
    "CAPTION_QUESTION",
    "EASYVQA_SKILLS",
    "ContinualStream",
    "Stage",
    "VQASample",
    "build_stream",
    "caption_samples",
    "clear_image_cache",
    "dirichlet_partition",
    "easyvqa_stream",
    "image_labels",
    "load_image",
    "manifest_stream",
    "parse_question",
    "partition_stream",
    "question_skill",
    "read_manifest",
    "skill_distribution",
    "skill_probabilities",
    "tokenize",
]
