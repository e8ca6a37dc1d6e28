"""Load the base MLLM: the cached tiny LLaVA or a local pre-trained checkpoint.

The model's family (``model.family``, or inferred from the checkpoint's config) is
bound to the loaded model; ``fed_asr.models.modules`` locates its parts through it,
and it picks the language model's attention implementation (SDPA, or eager for
Gemma 2's soft-capped logits). The processor is loaded by
``fed_asr.models.processors.load_processor`` (also without torchvision).

The tiny model is built, caption-pretrained and saved once per configuration under
``<cache_dir>/tiny-<hash>``; the hash covers the architecture, the pre-training
settings, the preparation images' contents (not their paths), the tokenizer
vocabulary and the seed. Every preparation computes on ``PREPARATION_THREADS`` CPU
threads, so one config prepares the same weights wherever it runs. Builds are
atomic (a temporary directory renamed into place, under a file lock), so concurrent
processes never see a partial model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fed_asr.config import DataConfig, ModelConfig
from fed_asr.models.capture import install_attention_capture
from fed_asr.models.device import resolve_device, resolve_dtype, torch_threads
from fed_asr.models.family import resolve_model_family
from fed_asr.models.modules import bind_model_family
from fed_asr.models.pretrain import (
    preparation_objects,
    preparation_samples,
    pretrain_base_model,
)
from fed_asr.models.processors import load_processor
from fed_asr.models.tiny import build_tiny, tiny_tokens
from fed_asr.models.vision_pretrain import pretrain_vision_tower

if TYPE_CHECKING:
    from fed_asr.data import ObjectImage, VQASample

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: the atomic rename still protects
    fcntl = None  # type: ignore[assignment]

CACHE_FORMAT = 1
META_FILE = "fed_asr_tiny.json"
# torch CPU threads of every preparation: another count changes the prepared weights
# in their last bits (`fed_asr.models.device.torch_threads`), so it is fixed
PREPARATION_THREADS = 1
# Caption pre-training images drawn by `fed_asr.data.caption_samples`.
PRETRAIN_IMAGES = 2000
_ARCH_FIELDS = (
    "image_size",
    "patch_size",
    "vision_hidden_size",
    "vision_layers",
    "vision_heads",
    "text_hidden_size",
    "text_layers",
    "text_heads",
    "text_intermediate_size",
)
_PRETRAIN_FIELDS = (
    "pretrain_steps",
    "pretrain_batch_size",
    "pretrain_lr",
    "prompt_template",
)


def _samples_fingerprint(samples: Sequence[VQASample] | None) -> str:
    """Stable digest of caller-given pre-training samples ("default" when None).

    Each image enters by its content, not its path, so the same data in another venv
    or folder (easy-VQA's images live inside the venv) finds the same cached base.
    """
    if samples is None:
        return f"caption_samples({PRETRAIN_IMAGES})"
    from fed_asr.data.images import image_file_digest

    digest = hashlib.sha256()
    for s in samples:
        image = image_file_digest(s.image)
        digest.update(f"{image}\0{s.question}\0{s.answer}\n".encode())
    return digest.hexdigest()


def _vision_spec(
    cfg: ModelConfig, objects: Sequence[ObjectImage] | None
) -> dict[str, Any]:
    """The vision preparation's part of the spec (empty without one: old hashes)."""
    if cfg.pretrain_vision_steps == 0:
        return {}
    from fed_asr.data.objects import objects_fingerprint

    return {
        "vision": {
            "pretrain_vision_steps": cfg.pretrain_vision_steps,
            "pretrain_vision_lr": cfg.pretrain_vision_lr,
            "objects": objects_fingerprint(objects or ()),
        }
    }


def tiny_model_spec(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    seed: int = 0,
    samples: Sequence[VQASample] | None = None,
    objects: Sequence[ObjectImage] | None = None,
) -> dict[str, Any]:
    """Everything that determines the cached tiny model's weights (hashed)."""
    return {
        **_vision_spec(cfg, objects),
        "format": CACHE_FORMAT,
        "architecture": {f: getattr(cfg, f) for f in _ARCH_FIELDS},
        "pretrain": {
            **{f: getattr(cfg, f) for f in _PRETRAIN_FIELDS},
            # only when set, so the bases prepared before this field keep their hash
            **(
                {"pretrain_qk_init": cfg.pretrain_qk_init}
                if cfg.pretrain_qk_init != 1.0
                else {}
            ),
        },
        "samples": _samples_fingerprint(samples),
        "tokens": tiny_tokens(vocabulary, cfg.prompt_template),
        "seed": seed,
    }


def tiny_model_dir(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    seed: int = 0,
    samples: Sequence[VQASample] | None = None,
    objects: Sequence[ObjectImage] | None = None,
) -> Path:
    """``<cfg.cache_dir>/tiny-<hash>`` for this configuration (may not exist yet)."""
    return _spec_dir(cfg, tiny_model_spec(cfg, vocabulary, seed, samples, objects))


def _spec_dir(cfg: ModelConfig, spec: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir).expanduser() / f"tiny-{digest}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (blocks until free)."""
    with open(path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_tiny_model(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    seed: int = 0,
    samples: Sequence[VQASample] | None = None,
    progress: bool = True,
    objects: Sequence[ObjectImage] | None = None,
) -> Path:
    """Build, prepare and save the tiny model unless it is cached.

    Parameters
    ----------
    cfg : ModelConfig
        Tiny architecture, pre-training settings and ``cache_dir``.
    vocabulary : Sequence[str]
        Words of the stream.
    seed : int
        Seeds initialisation, caption subset and batch order.
    samples : Sequence[VQASample] | None
        Pre-training samples; ``fed_asr.data.caption_samples`` when None.
    progress : bool
        Print pre-training progress.
    objects : Sequence[ObjectImage] | None
        Labelled-object images of the vision tower preparation; required when
        ``cfg.pretrain_vision_steps > 0`` (``preparation_objects``).

    Returns
    -------
    Path
        Directory loadable with ``from_pretrained`` (model + processor).

    Raises
    ------
    ValueError
        A vision preparation without ``objects``.
    """
    if cfg.pretrain_vision_steps and not objects:
        raise ValueError(
            "`model.pretrain_vision_steps` > 0 needs labelled-object images: pass "
            "`objects=preparation_objects(cfg, 0, data)`."
        )
    spec = tiny_model_spec(cfg, vocabulary, seed, samples, objects)
    final = _spec_dir(cfg, spec)
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.with_name(final.name + ".lock")):
        if (final / META_FILE).is_file():  # another process finished meanwhile
            return final
        if final.exists():  # not ours and incomplete: never produced by a rename
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            model, processor, meta = _prepare_tiny(
                cfg, vocabulary, seed, samples, objects, progress
            )
            meta = {"spec": spec, **meta}  # the spec the directory name hashes
            model.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _prepare_tiny(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    seed: int,
    samples: Sequence[VQASample] | None,
    objects: Sequence[ObjectImage] | None,
    progress: bool,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Build and prepare the tiny model on ``PREPARATION_THREADS`` CPU threads."""
    meta: dict[str, Any] = {"threads": PREPARATION_THREADS}
    if samples is None:
        from fed_asr.data import caption_samples

        samples = caption_samples(PRETRAIN_IMAGES, seed)
    with torch_threads(PREPARATION_THREADS):
        model, processor = build_tiny(cfg, vocabulary, seed)
        if cfg.pretrain_vision_steps:
            vision = pretrain_vision_tower(
                model, processor, objects or (), cfg, seed, progress
            )
            meta["pretrain_vision"] = dataclasses.asdict(vision)
        result = pretrain_base_model(
            model,
            processor,
            samples,
            cfg,
            seed,
            progress,
            train_vision=not cfg.pretrain_vision_steps,
        )
    meta["pretrain"] = dataclasses.asdict(result)
    return model, processor, meta


def four_bit_config(dtype: torch.dtype, device: torch.device) -> Any:
    """``BitsAndBytesConfig`` of a 4-bit (NF4) base model computing in ``dtype``.

    Raises
    ------
    ValueError
        ``device`` is not CUDA, or bitsandbytes is not installed.
    """
    if device.type != "cuda":
        raise ValueError(
            f"`model.load_in_4bit=true` needs a CUDA device, got {str(device)!r}; "
            "set `model.load_in_4bit=false` to load the full-precision weights."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            "`model.load_in_4bit=true` needs the bitsandbytes package (pip install "
            "bitsandbytes); it is not installed."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )


def _model_path(cfg: ModelConfig) -> Path:
    """Return the checked local directory of a pre-trained checkpoint."""
    path = Path(str(cfg.path)).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"`model.path` {str(path)!r} is not a local model directory (no "
            "config.json); "
            "nothing is downloaded, so point it at a saved checkpoint of a registered "
            "model family."
        )
    return path


def load_base_model(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    device: str | torch.device | None = None,
    *,
    seed: int = 0,
    samples: Sequence[VQASample] | None = None,
    progress: bool = True,
    objects: Sequence[ObjectImage] | None = None,
) -> tuple[nn.Module, Any]:
    """Load the frozen base MLLM and its processor.

    Parameters
    ----------
    cfg : ModelConfig
        ``name="tiny"`` (built and cached, see ``ensure_tiny_model``) or
        ``"pretrained"`` (``cfg.path``, local files only).
    vocabulary : Sequence[str]
        Words of the stream (tiny tokenizer; ignored for ``pretrained``).
    device : str | torch.device | None
        Target device; ``cfg.device`` when None (``"auto"``: CUDA if available).
    seed : int
        Tiny model only: seeds its initialisation and pre-training.
    samples : Sequence[VQASample] | None
        Tiny model only: pre-training samples (default: caption samples).
    progress : bool
        Print pre-training progress when the tiny model is built.
    objects : Sequence[ObjectImage] | None
        Tiny model only: images of the vision tower preparation
        (``model.pretrain_vision_steps``).

    Returns
    -------
    tuple[nn.Module, Any]
        The model (eval mode, every weight frozen, dtype from ``cfg.dtype``, 4-bit
        with ``cfg.load_in_4bit``; the language model uses the capturing attention
        around its family's implementation, ``sdpa`` or ``eager``; its family,
        ``cfg.family`` or inferred from its config, is bound to it) and the
        processor.

    Raises
    ------
    FileNotFoundError
        ``pretrained`` with a ``cfg.path`` that is not a local model directory.
    ValueError
        ``cfg.family`` is None and no registered family (or several) matches the
        checkpoint's config, or ``cfg.load_in_4bit`` without CUDA or bitsandbytes.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    target = resolve_device(cfg.device if device is None else device)
    dtype = resolve_dtype(cfg.dtype, target)
    quantization = four_bit_config(dtype, target) if cfg.load_in_4bit else None
    if cfg.name == "tiny":
        path = ensure_tiny_model(cfg, vocabulary, seed, samples, progress, objects)
    else:
        path = _model_path(cfg)
    # Resolve the family before loading the weights, so a mismatch fails fast.
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    family = resolve_model_family(cfg.family, config)
    placement: dict[str, Any] = {}
    if quantization is not None:
        placement = {"quantization_config": quantization, "device_map": {"": target}}
    model = AutoModelForImageTextToText.from_pretrained(
        str(path),
        dtype=dtype,
        local_files_only=True,
        attn_implementation=family.attention_implementation(config),
        **placement,
    )
    processor = load_processor(path, config.model_type)
    if quantization is None:
        model.to(target)
    model.requires_grad_(False)
    model.eval()
    bind_model_family(model, family)
    install_attention_capture(model)
    return model, processor


_CACHE_LOCK = threading.Lock()


def cached_base_model(
    cfg: ModelConfig,
    vocabulary: Sequence[str],
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[nn.Module, Any]:
    """``load_base_model`` once per process and arguments (e.g. a Flower client).

    The same model object is returned on every call. Callers must not change its base
    weights: attach LoRA once (``attach_lora``) and replace adapter weights with
    ``load_adapter_state`` for each round. peft injects adapters in place, so after
    ``attach_lora`` the cached object carries the adapter layers too.

    Returns
    -------
    tuple[nn.Module, Any]
        The shared (model, processor).
    """
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    target = str(resolve_device(cfg.device if device is None else device))
    with _CACHE_LOCK:
        return _cached_base_model(key, tuple(vocabulary), target, seed)


@cache
def _cached_base_model(
    cfg_json: str, vocabulary: tuple[str, ...], device: str, seed: int
) -> tuple[nn.Module, Any]:
    """Memoised loader behind ``cached_base_model`` (hashable arguments only)."""
    cfg = ModelConfig(**json.loads(cfg_json))
    return load_base_model(cfg, list(vocabulary), torch.device(device), seed=seed)


def load_run_base_model(
    model: ModelConfig,
    data: DataConfig,
    vocabulary: Sequence[str],
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """The base model of a run: ``load_base_model`` with its configured preparation.

    ``model.pretrain_data`` picks the preparation samples (``preparation_samples``),
    ``model.pretrain_vision_steps`` the vision tower's (``preparation_objects``);
    the base is prepared with ``model.pretrain_seed`` whatever the run's seed, so
    runs of different seeds share one base, as they would share one pretrained
    checkpoint.
    """
    seed = model.pretrain_seed
    samples = preparation_samples(model, seed, data)
    objects = preparation_objects(model, seed, data)
    return load_base_model(
        model, vocabulary, device, seed=seed, samples=samples, objects=objects
    )
