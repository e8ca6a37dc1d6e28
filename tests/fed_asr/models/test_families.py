"""Real model families behind ``ModelFamily``: PaliGemma 1/2, Qwen2-VL, Qwen2.5-VL,
Idefics3 (SmolVLM's layout) and LLaVA-OneVision.

Each family is a tiny random checkpoint of its own transformers config and model
classes, with the family's processor, saved with ``save_pretrained`` and loaded
through ``model=pretrained model.path=...`` (``fed_asr.models.tiny_families``).
``-k family`` selects these tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from fed_asr.central import run_central
from fed_asr.config import ModelConfig, compose_config
from fed_asr.data import VQASample, build_stream
from fed_asr.models import (
    VQACollator,
    attach_lora,
    forward_with_attention,
    load_base_model,
    model_family,
    save_adapter,
)
from fed_asr.models.capture import (
    SELECTIVE_ATTENTION,
    SELECTIVE_EAGER_ATTENTION,
    text_attention,
)
from fed_asr.models.scoring import score_candidates
from fed_asr.models.tiny_families import TINY_TEMPLATES, save_tiny_checkpoint
from fed_asr.models.tiny_families import build_paligemma as _build_paligemma

KINDS = (
    "paligemma",
    "paligemma2",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "llava_onevision",
)
FAMILY_OF = {
    "paligemma": "paligemma",
    "paligemma2": "paligemma",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "idefics3": "idefics3",
    "llava_onevision": "llava_onevision",
}
ATTENTION_OF = {
    "paligemma": SELECTIVE_ATTENTION,
    "paligemma2": SELECTIVE_EAGER_ATTENTION,  # Gemma 2 soft-caps: eager, not SDPA
    "qwen2_vl": SELECTIVE_ATTENTION,
    "qwen2_5_vl": SELECTIVE_ATTENTION,
    "idefics3": SELECTIVE_ATTENTION,
    "llava_onevision": SELECTIVE_ATTENTION,
}
# Stitched map of a 32x32 test image: Idefics3's 2x2 tiles of 2x2 tokens, and
# LLaVA-OneVision's 2x2 anyres crops of 4x4 tokens.
GRID_OF = {"idefics3": (4, 4), "llava_onevision": (8, 8)}
VOCAB = [
    "what", "color", "is", "the", "shape", "there", "a", "not", "in", "image",
    "red", "blue", "green", "circle", "rectangle", "triangle", "yes", "no",
]  # fmt: skip
MODEL_TYPE_OF = {
    "paligemma": "paligemma",
    "paligemma2": "paligemma",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "idefics3": "idefics3",
    "llava_onevision": "llava_onevision",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint of every kind (vocabulary: the test samples')."""
    root = tmp_path_factory.mktemp("family_checkpoints")
    return {kind: save_tiny_checkpoint(kind, root / kind, VOCAB) for kind in KINDS}


def _load(path: Path, kind: str, **overrides: Any) -> tuple[Any, Any, ModelConfig]:
    """``load_base_model`` of the saved checkpoint with ``model=pretrained``."""
    cfg = ModelConfig(
        name="pretrained",
        path=str(path),
        prompt_template=TINY_TEMPLATES[kind],
        device="cpu",
        **overrides,
    )
    model, processor = load_base_model(cfg, [], "cpu")
    return model, processor, cfg


def _perturbed_lora(model: Any, seed: int = 0) -> Any:
    """LoRA on q/v with non-zero B, so the adapters change the outputs."""
    from fed_asr.config import LoraConfig

    peft_model = attach_lora(model, LoraConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return peft_model


@pytest.mark.parametrize("kind", KINDS)
def test_family_loads_from_saved_checkpoint_with_inferred_family(
    checkpoints: dict[str, Path], kind: str
) -> None:
    # Execute
    model, processor, _ = _load(checkpoints[kind], kind)

    # Assert
    family = model_family(model)
    assert model.config.model_type == MODEL_TYPE_OF[kind]
    assert (
        type(family).__name__
        == {
            "paligemma": "PaliGemmaFamily",
            "qwen2_vl": "Qwen2VLFamily",
            "idefics3": "Idefics3Family",
            "llava_onevision": "LlavaOnevisionFamily",
        }[FAMILY_OF[kind]]
    )
    assert family.text_config(model)._attn_implementation == ATTENTION_OF[kind]
    assert not any(p.requires_grad for p in model.parameters())
    assert processor.tokenizer.convert_tokens_to_ids("circle") != (
        processor.tokenizer.unk_token_id
    )


@pytest.mark.parametrize("kind", KINDS)
def test_family_capture_equals_eager_with_gradients_into_lora(
    checkpoints: dict[str, Path], kind: str, vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor, cfg = _load(checkpoints[kind], kind)
    peft_model = _perturbed_lora(model)
    collator = VQACollator(
        processor, cfg.prompt_template, ["red", "no"], family=model_family(model)
    )
    batch = collator(vqa_samples)
    lora = [p for p in peft_model.parameters() if p.requires_grad]

    # Execute
    selective = forward_with_attention(peft_model, batch, 2, "selective", hidden=True)
    eager = forward_with_attention(peft_model, batch, 2, "eager", hidden=True)
    grads = [
        torch.autograd.grad(r.attn.square().sum() + r.loss, lora)
        for r in (selective, eager)
    ]

    # Assert
    assert selective.grid == eager.grid == GRID_OF.get(kind, (4, 4))
    assert selective.attn.shape[:2] == (len(vqa_samples), 2)
    assert float(selective.attn.sum(-1).max()) > 0.0
    torch.testing.assert_close(selective.attn, eager.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective.logits, eager.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(selective.loss, eager.loss, rtol=0, atol=1e-5)
    assert max(float(g.abs().max()) for g in grads[0]) > 0.0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_family_paligemma_collator_matches_processor_and_is_prefix_lm(
    checkpoints: dict[str, Path], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    from fed_asr.data import load_image

    model, processor, cfg = _load(checkpoints["paligemma"], "paligemma")
    collator = VQACollator(
        processor, cfg.prompt_template, [], family=model_family(model)
    )
    sample = vqa_samples[0]
    prompt = f"answer en {sample.question}"

    # Execute
    batch = collator([sample])
    reference = processor(
        text=[f"{processor.image_token}{prompt}"],
        images=[load_image(sample.image)],
        suffix=[sample.answer],
        return_tensors="pt",
    )
    capture = forward_with_attention(model, batch, 1, "eager")

    # Assert: the processor's own encoding (image, <bos>, prompt, "\n" | answer, eos)
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()
    assert batch["token_type_ids"].tolist() == reference["token_type_ids"].tolist()
    assert batch["labels"].tolist() == reference["labels"].tolist()
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"])
    # prefix-LM: the image attends to the prompt after it (not so in a causal LM)
    with torch.no_grad(), text_attention(model, "eager"):
        out = model(
            **{k: batch[k] for k in collator.model_input_keys},
            output_attentions=True,
        )
    prompt_end = int(batch["prompt_length"][0])
    image_to_prompt = out.attentions[0][0, :, :16, 16:prompt_end]  # (H, P, T)
    answer_to_later = out.attentions[0][0, :, prompt_end, prompt_end + 1 :]
    assert float(image_to_prompt.sum()) > 0.0
    assert float(answer_to_later.abs().sum()) == 0.0
    assert capture.attn.shape[-1] == 16


def test_family_paligemma_without_token_types_differs_from_with(
    checkpoints: dict[str, Path], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor, cfg = _load(checkpoints["paligemma"], "paligemma")
    batch = VQACollator(processor, cfg.prompt_template, [], family=model_family(model))(
        vqa_samples
    )
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    # Execute
    with torch.no_grad():
        prefix_lm = model(**inputs, token_type_ids=batch["token_type_ids"]).logits
        without = model(**inputs).logits

    # Assert: token types change the attention, so the collator must send them
    assert not torch.allclose(prefix_lm, without, atol=1e-4)


def test_family_qwen2_vl_positions_are_mrope_and_packed_scoring_keeps_them(
    checkpoints: dict[str, Path], vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor, cfg = _load(checkpoints["qwen2_vl"], "qwen2_vl")
    family = model_family(model)
    collator = VQACollator(processor, cfg.prompt_template, ["red", "no"], family=family)
    batch = collator(vqa_samples)
    candidates = collator.candidate_token_ids()
    peft_model = _perturbed_lora(model).eval()

    # Execute
    positions = family.position_ids(peft_model, batch)  # (3, B, S)
    packed = score_candidates(peft_model, batch, candidates, "packed")
    forced = score_candidates(peft_model, batch, candidates, "teacher_forcing")

    # Assert: the image's 4x4 tokens carry rows and columns; text continues after
    start, end = batch["image_start"], batch["image_end"]
    image = positions[:, 0, start:end]
    assert image[1].tolist() == [start + r for r in range(4) for _ in range(4)]
    assert image[2].tolist() == [start + c for _ in range(4) for c in range(4)]
    assert positions[:, 0, end].tolist() == [start + 4] * 3
    torch.testing.assert_close(packed, forced, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kind", ["paligemma", "qwen2_5_vl", "idefics3", "llava_onevision"]
)
def test_family_packed_scoring_equals_teacher_forcing(
    checkpoints: dict[str, Path], kind: str, vqa_samples: list[VQASample]
) -> None:
    # Prepare
    model, processor, cfg = _load(checkpoints[kind], kind)
    collator = VQACollator(
        processor,
        cfg.prompt_template,
        ["red", "no", "green circle"],
        family=model_family(model),
    )
    batch = collator(vqa_samples)
    candidates = collator.candidate_token_ids()

    # Execute
    packed = score_candidates(model, batch, candidates, "packed")
    forced = score_candidates(model, batch, candidates, "teacher_forcing")

    # Assert
    torch.testing.assert_close(packed, forced, rtol=0, atol=1e-4)


def test_family_paligemma2_sliding_window_shorter_than_rows_scores_by_teacher_forcing(
    checkpoints: dict[str, Path], vqa_samples: list[VQASample]
) -> None:
    # Prepare: the tiny Gemma 2 window (16) is shorter than a packed row
    model, processor, cfg = _load(checkpoints["paligemma2"], "paligemma2")
    collator = VQACollator(
        processor, cfg.prompt_template, ["red", "no"], family=model_family(model)
    )
    batch = collator(vqa_samples)
    candidates = collator.candidate_token_ids()

    # Execute
    auto = score_candidates(model, batch, candidates, "auto")
    forced = score_candidates(model, batch, candidates, "teacher_forcing")

    # Assert
    torch.testing.assert_close(auto, forced, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_family_central_asr_stage_writes_metrics_and_adapter_reloads(
    tmp_path: Path, kind: str
) -> None:
    # Prepare: a checkpoint whose tokenizer knows the easy-VQA stream's words
    overrides = [
        "engine=central",
        "model=pretrained",
        f"model.path={tmp_path / 'ckpt'}",
        f"model.prompt_template='{TINY_TEMPLATES[kind]}'",
        "model.dtype=float32",
        "model.device=cpu",
        "data.max_train_per_stage=4",
        "data.max_test_per_stage=4",
        "data.stage_order=[shape]",
        "train.batch_size=4",
        "train.eval_batch_size=4",
        "train.max_steps_per_stage=1",
        "regularizer.l_sel=2",
        "progress=false",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = compose_config("config", overrides)
    vocabulary = build_stream(cfg.data, cfg.seed).vocabulary()
    save_tiny_checkpoint(kind, tmp_path / "ckpt", vocabulary)

    # Execute
    metrics = json.loads(run_central(cfg).read_text())

    # Assert: one ASR stage ran and was scored
    assert metrics["method"] == "asr"
    assert metrics["accuracy_matrix"][0][0] is not None
    adapter_dir = Path(cfg.output_dir) / "adapter"
    base, processor = load_base_model(cfg.model, vocabulary, "cpu")
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    stream = build_stream(cfg.data, cfg.seed)
    collator = VQACollator(
        processor,
        cfg.model.prompt_template,
        stream.answers,
        family=model_family(base),
    )
    batch = collator(stream.stages[0].test[:2])
    inputs = {k: batch[k] for k in collator.model_input_keys}
    with torch.no_grad():
        adapted = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            plain = reloaded(**inputs).logits
    # the trained adapter (lora_B moved off zero in its one step) changes the logits
    assert not torch.allclose(adapted, plain, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_family_adapter_saved_reloads_with_peft_and_gives_same_logits(
    checkpoints: dict[str, Path],
    tmp_path: Path,
    kind: str,
    vqa_samples: list[VQASample],
) -> None:
    # Prepare
    model, processor, cfg = _load(checkpoints[kind], kind)
    peft_model = _perturbed_lora(model).eval()
    collator = VQACollator(
        processor, cfg.prompt_template, [], family=model_family(model)
    )
    batch = collator(vqa_samples)
    inputs = {k: batch[k] for k in collator.model_input_keys if k != "labels"}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            plain = peft_model(**inputs).logits
    save_adapter(peft_model, tmp_path / "adapter")
    base, _, _ = _load(checkpoints[kind], kind)

    # Execute
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = reloaded(**inputs).logits

    # Assert
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits, plain, atol=1e-4)


def test_family_four_bit_without_cuda_refused_with_one_line(
    checkpoints: dict[str, Path],
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`model.load_in_4bit=true` needs a CUDA"):
        _load(checkpoints["paligemma"], "paligemma", load_in_4bit=True)


def test_family_tiny_paligemma_build_is_seeded() -> None:
    # Execute
    first, _ = _build_paligemma(["red"], TINY_TEMPLATES["paligemma"], 3, False)
    again, _ = _build_paligemma(["red"], TINY_TEMPLATES["paligemma"], 3, False)
    other, _ = _build_paligemma(["red"], TINY_TEMPLATES["paligemma"], 4, False)

    # Assert
    a, b, c = (dict(m.state_dict()) for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_family_qwen2_vl_images_of_different_sizes_in_one_batch_refused(
    checkpoints: dict[str, Path], tmp_path: Path, vqa_samples: list[VQASample]
) -> None:
    # Prepare: a 32x16 image expands to 4x2 tokens, the 32x32 ones to 4x4
    from PIL import Image

    model, processor, cfg = _load(checkpoints["qwen2_vl"], "qwen2_vl")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (16, 32), (200, 0, 0)).save(wide)
    collator = VQACollator(
        processor, cfg.prompt_template, [], family=model_family(model)
    )
    odd = dataclasses.replace(vqa_samples[0], image=str(wide))

    # Execute
    alone = collator([odd])

    # Assert: its own grid when alone; a clear error when mixed with other sizes
    assert collator.num_image_tokens(str(wide)) == 8
    assert alone["image_grid_thw"].tolist() == [[1, 8, 4]]
    spans = model_family(model).spans_of_batch(model.config, alone)
    assert spans[0][0].grid == (4, 2)
    with pytest.raises(ValueError, match="different numbers of tokens"):
        collator([vqa_samples[0], odd])
