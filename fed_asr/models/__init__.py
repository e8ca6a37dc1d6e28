"""Base MLLM (tiny LLaVA or a local family checkpoint), LoRA, batching, capture."""

from fed_asr.models.batching import IGNORE_INDEX, MODEL_INPUT_KEYS, VQACollator
from fed_asr.models.capture import (
    CaptureResult,
    forward_with_attention,
    install_attention_capture,
    model_inputs,
)
from fed_asr.models.device import (
    model_device,
    model_dtype,
    move_batch,
    resolve_device,
    resolve_dtype,
    torch_threads,
)
from fed_asr.models.families import LlavaFamily, PaliGemmaFamily, Qwen2VLFamily
from fed_asr.models.family import (
    MODEL_FAMILIES,
    EncodedImage,
    ImageSpan,
    ModelFamily,
    get_model_family,
    infer_model_family,
    model_family_names,
    register_model_family,
    resolve_model_family,
)
from fed_asr.models.loading import (
    cached_base_model,
    ensure_tiny_model,
    load_base_model,
    load_run_base_model,
    tiny_model_dir,
)
from fed_asr.models.lora import (
    adapter_state,
    attach_lora,
    load_adapter,
    load_adapter_state,
    save_adapter,
)
from fed_asr.models.modules import bind_model_family, model_family
from fed_asr.models.pretrain import PretrainResult, pretrain_base_model
from fed_asr.models.scoring import candidate_token_ids, predict, score_candidates
from fed_asr.models.tiny import build_tiny

__all__ = [
    "IGNORE_INDEX",
    "MODEL_FAMILIES",
    "MODEL_INPUT_KEYS",
    "CaptureResult",
    "EncodedImage",
    "ImageSpan",
    "LlavaFamily",
    "ModelFamily",
    "PaliGemmaFamily",
    "PretrainResult",
    "Qwen2VLFamily",
    "VQACollator",
    "adapter_state",
    "attach_lora",
    "bind_model_family",
    "build_tiny",
    "cached_base_model",
    "candidate_token_ids",
    "ensure_tiny_model",
    "forward_with_attention",
    "get_model_family",
    "infer_model_family",
    "install_attention_capture",
    "load_adapter",
    "load_adapter_state",
    "load_base_model",
    "load_run_base_model",
    "model_device",
    "model_dtype",
    "model_family",
    "model_family_names",
    "model_inputs",
    "move_batch",
    "predict",
    "pretrain_base_model",
    "register_model_family",
    "resolve_model_family",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
    "save_adapter",
    "score_candidates",
    "tiny_model_dir",
]
