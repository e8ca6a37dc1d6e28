"""Tests of base-model loading: tiny cache, determinism, checkpoints, dtype, device."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

import fed_asr.models.loading as loading
from fed_asr.config import ModelConfig
from fed_asr.data import VQASample
from fed_asr.models import (
    MODEL_INPUT_KEYS,
    VQACollator,
    cached_base_model,
    load_base_model,
    pretrain_base_model,
    resolve_device,
    resolve_dtype,
    tiny_model_dir,
)
from fed_asr.models.capture import SELECTIVE_ATTENTION
from fed_asr.models.tiny import build_tiny


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_base_model_tiny_builds_once_then_reuses_cache(
    cfg: ModelConfig, vocab: list[str], caption_set: list[VQASample]
) -> None:
    # Prepare
    first, _ = load_base_model(cfg, vocab, "cpu", samples=caption_set, progress=False)
    path = tiny_model_dir(cfg, vocab, 0, caption_set)
    stamp = (path / loading.META_FILE).stat().st_mtime_ns
    weights_stamp = (path / "model.safetensors").stat().st_mtime_ns

    # Execute
    second, processor = load_base_model(
        cfg, vocab, "cpu", samples=caption_set, progress=False
    )

    # Assert
    assert path.parent == Path(cfg.cache_dir)
    assert (path / loading.META_FILE).stat().st_mtime_ns == stamp
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_stamp
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    a, b = _weights(first), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        processor.tokenizer.convert_tokens_to_ids("circle")
        != processor.tokenizer.unk_token_id
    )


def test_load_base_model_same_seed_is_deterministic_other_seed_differs(
    cfg: ModelConfig, vocab: list[str], caption_set: list[VQASample], tmp_path: Path
) -> None:
    # Prepare
    other_dir = dataclasses.replace(cfg, cache_dir=str(tmp_path / "other"))

    # Execute
    first, _ = load_base_model(cfg, vocab, "cpu", samples=caption_set, progress=False)
    again, _ = load_base_model(
        other_dir, vocab, "cpu", samples=caption_set, progress=False
    )
    seeded, _ = load_base_model(
        cfg, vocab, "cpu", seed=1, samples=caption_set, progress=False
    )

    # Assert
    a, b, c = _weights(first), _weights(again), _weights(seeded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_load_base_model_returns_frozen_eval_model_with_capture(
    cfg: ModelConfig, vocab: list[str], caption_set: list[VQASample]
) -> None:
    # Execute
    model, _ = load_base_model(cfg, vocab, "cpu", samples=caption_set, progress=False)

    # Assert
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.config.text_config._attn_implementation == SELECTIVE_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_model_dir_changes_with_architecture_vocabulary_and_seed(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Execute
    base = tiny_model_dir(cfg, vocab)
    wider = tiny_model_dir(dataclasses.replace(cfg, text_hidden_size=64), vocab)
    more_words = tiny_model_dir(cfg, [*vocab, "purple"])
    reseeded = tiny_model_dir(cfg, vocab, seed=1)
    same = tiny_model_dir(cfg, list(reversed(vocab)))

    # Assert
    assert len({base, wider, more_words, reseeded}) == 4
    assert same == base


def test_ensure_tiny_model_concurrent_calls_build_once(
    cfg: ModelConfig,
    vocab: list[str],
    caption_set: list[VQASample],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    calls: list[int] = []
    real = loading.pretrain_base_model

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "pretrain_base_model", counting)
    results: list[Path] = []

    def build() -> None:
        results.append(loading.ensure_tiny_model(cfg, vocab, 0, caption_set, False))

    # Execute
    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1
    assert (results[0] / loading.META_FILE).is_file()


def test_pretrain_base_model_lowers_caption_loss(
    cfg: ModelConfig, vocab: list[str], caption_set: list[VQASample]
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab, seed=0)
    settings = dataclasses.replace(cfg, pretrain_steps=25, pretrain_batch_size=9)
    batch = VQACollator(processor, cfg.prompt_template, [])(caption_set)
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS}
    with torch.no_grad():
        before = float(model(**inputs).loss)

    # Execute
    result = pretrain_base_model(
        model, processor, caption_set, settings, progress=False
    )

    # Assert
    with torch.no_grad():
        after = float(model(**inputs).loss)
    assert result.steps == 25
    assert after < 0.7 * before
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_load_base_model_pretrained_reads_local_directory(
    cfg: ModelConfig, vocab: list[str], tmp_path: Path
) -> None:
    # Prepare
    model, processor = build_tiny(cfg, vocab, seed=4)
    model.save_pretrained(str(tmp_path / "ckpt"))
    processor.save_pretrained(str(tmp_path / "ckpt"))
    settings = ModelConfig(name="pretrained", path=str(tmp_path / "ckpt"))

    # Execute
    loaded, reprocessor = load_base_model(settings, [], "cpu")

    # Assert
    a, b = _weights(model), _weights(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert reprocessor.image_token == processor.image_token


def test_load_base_model_pretrained_missing_path_names_it(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "no-such-model"
    settings = ModelConfig(name="pretrained", path=str(missing))

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_base_model(settings, [], "cpu")


def test_cached_base_model_returns_same_object(
    cfg: ModelConfig, vocab: list[str]
) -> None:
    # Prepare (default caption samples from easy-VQA; no pre-training steps)
    settings = dataclasses.replace(cfg, pretrain_steps=0)

    # Execute
    first = cached_base_model(settings, tuple(vocab), "cpu")
    second = cached_base_model(settings, list(vocab), torch.device("cpu"))

    # Assert
    assert first[0] is second[0] and first[1] is second[1]


def test_resolve_dtype_half_precision_on_cpu_warns_and_uses_float32() -> None:
    # Execute
    with pytest.warns(UserWarning, match="will be ignored"):
        dtype = resolve_dtype("bfloat16", torch.device("cpu"))

    # Assert
    assert dtype == torch.float32
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_resolve_device_auto_and_invalid() -> None:
    # Execute
    auto = resolve_device("auto")

    # Assert
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="model.device"):
        resolve_device("not-a-device")
