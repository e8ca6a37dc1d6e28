"""Built-in model families, one module each, registered here (one line per family)."""

from fed_asr.models.families.idefics3 import Idefics3Family
from fed_asr.models.families.llava import LlavaFamily
from fed_asr.models.families.llava_onevision import LlavaOnevisionFamily
from fed_asr.models.families.paligemma import PaliGemmaFamily
from fed_asr.models.families.qwen2_vl import Qwen2VLFamily
from fed_asr.models.family import register_model_family

register_model_family("llava", LlavaFamily)
register_model_family("paligemma", PaliGemmaFamily)
register_model_family("qwen2_vl", Qwen2VLFamily)
register_model_family("idefics3", Idefics3Family)
register_model_family("llava_onevision", LlavaOnevisionFamily)

__all__ = [
    "Idefics3Family",
    "LlavaFamily",
    "LlavaOnevisionFamily",
    "PaliGemmaFamily",
    "Qwen2VLFamily",
]
