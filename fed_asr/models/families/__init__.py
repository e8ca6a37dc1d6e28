"""Built-in model families, one module each, registered here (one line per family)."""

from fed_asr.models.families.llava import LlavaFamily
from fed_asr.models.family import register_model_family

register_model_family("llava", LlavaFamily)

__all__ = ["LlavaFamily"]
