"""Load a checkpoint's processor, also where its video half cannot be built.

Processors of Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision or SmolVLM hold a video processor
next to the image processor. transformers builds video processors only with
torchvision installed, and refuses the whole processor without one, although
fed-asr feeds images only. ``load_processor`` then loads the same processor class
without its video attribute (``image_only_processor_class``): the tokenizer, the
image processor, the chat template and the image-token expansion are the
checkpoint's own.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

VIDEO_ATTRIBUTE = "video_processor"


@functools.cache
def image_only_processor_class(cls: type) -> type:
    """``cls`` (a transformers processor class) without its video processor.

    Parameters
    ----------
    cls : type
        A ``ProcessorMixin`` subclass such as ``Qwen2VLProcessor``.

    Returns
    -------
    type
        A subclass of the same name whose attributes omit ``video_processor``;
        ``save_pretrained`` still writes ``cls``'s name, so the saved processor
        loads with ``AutoProcessor`` where torchvision is installed.
    """
    attributes = [a for a in cls.get_attributes() if a != VIDEO_ATTRIBUTE]

    def get_attributes(_: type) -> list[str]:
        return list(attributes)

    return type(
        cls.__name__,
        (cls,),
        {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__},
    )


def processor_class(model_type: str) -> type | None:
    """Return the processor class of a checkpoint ``model_type`` (or None)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return None if name is None else getattr(transformers, name, None)


def needs_image_only(cls: type | None) -> bool:
    """Whether ``cls`` has a video processor that cannot be built here."""
    from transformers.utils import is_torchvision_available

    return (
        cls is not None
        and VIDEO_ATTRIBUTE in cls.get_attributes()
        and not is_torchvision_available()
    )


def load_processor(path: str | Path, model_type: str) -> Any:
    """Load the processor saved at ``path`` (local files only).

    Parameters
    ----------
    path : str | Path
        A checkpoint directory.
    model_type : str
        The checkpoint's ``config.model_type``.

    Returns
    -------
    Any
        ``AutoProcessor.from_pretrained(path)``, or, without torchvision, the same
        processor class without its video processor.
    """
    from transformers import AutoProcessor

    cls = processor_class(model_type)
    if needs_image_only(cls):
        assert cls is not None
        return image_only_processor_class(cls).from_pretrained(
            str(path), local_files_only=True
        )
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)
