"""Model families: where a multimodal LLM keeps its parts and its image tokens.

A ``ModelFamily`` tells the rest of ``fed_asr.models`` everything that depends on the
checkpoint's architecture: where the language model (its decoder layers and their
attention modules) and the vision tower live, which attention implementation its
language model runs, how image tokens are laid out in the input ids (spans, each with
its token grid and its place in the image's stitched map), what one image expands to
in the prompt and which processor outputs come with it, the prompt format the family
was trained with, the extra token inputs (e.g. PaliGemma's prefix-LM
``token_type_ids``), the position ids of a batch (e.g. Qwen2-VL's M-RoPE), and which
checkpoint configs (``model_type``) belong to the family.

Families are registered by name, the way peft registers its tuners::

    register_model_family("llava", LlavaFamily)

The built-in families are registered in ``fed_asr.models.families``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fed_asr.registry import check_new_name, lookup


@dataclass(frozen=True)
class ImageSpan:
    """Positions ``start..end-1`` of one image's tokens in a row of input ids.

    Attributes
    ----------
    start : int
        Position of the first image token.
    end : int
        One past the last image token.
    grid : tuple[int, int]
        (Gh, Gw) token grid of the image, row-major, ``end - start == Gh * Gw``.
    origin : tuple[int, int] | None
        (row, column) of the span's first token in the row's stitched image map
        (tiles and crops of one image sit side by side there); None for a span that
        is not part of the map (e.g. a low-resolution overview of the same image).
    """

    start: int
    end: int
    grid: tuple[int, int]
    origin: tuple[int, int] | None = (0, 0)

    def __post_init__(self) -> None:
        if self.end - self.start != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"An image span of {self.end - self.start} tokens "
                f"[{self.start}, {self.end}) does not fit its grid {self.grid}."
            )


@dataclass
class EncodedImage:
    """One image as the prompt and the forward pass take it.

    Attributes
    ----------
    token_ids : list[int]
        Ids that replace the image's one placeholder token in the prompt.
    inputs : dict[str, Tensor]
        Processor outputs of this image alone (leading dimension 1), e.g.
        ``pixel_values`` or ``image_grid_thw``.
    """

    token_ids: list[int]
    inputs: dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Memory held by the tensors."""
        return sum(v.numel() * v.element_size() for v in self.inputs.values())


def inner_module(
    model: nn.Module, name: str, family: str, *, needs_layers: bool = False
) -> nn.Module:
    """``model.model.<name>``, the layout of families that nest their towers there.

    Raises
    ------
    TypeError
        ``model.model.<name>`` is missing (or has no ``layers`` when
        ``needs_layers``): ``model`` is not a ``family`` model.
    """
    candidate = getattr(getattr(model, "model", None), name, None)
    if needs_layers:
        missing, what = (
            candidate is None or not hasattr(candidate, "layers"),
            " with `layers`",
        )
    else:
        missing, what = not isinstance(candidate, nn.Module), ""
    if missing:
        raise TypeError(
            f"{type(model).__name__} has no `model.{name}`{what}: not the "
            f"{family} layout."
        )
    return candidate  # type: ignore[return-value]


class ModelFamily(ABC):
    """Architecture-specific layout of a multimodal LLM (one subclass per family).

    Methods take the transformers model (outside any peft wrapper) or its top-level
    config; the family itself holds no state.

    Attributes
    ----------
    model_types : tuple[str, ...]
        ``config.model_type`` values of the checkpoints of this family (used to infer
        the family when ``model.family`` is None).
    forward_inputs : tuple[str, ...]
        Processor outputs the model's forward takes (without ``labels``).
    image_inputs : tuple[str, ...]
        Those of ``forward_inputs`` that come from the images (``encode_image``).
    token_inputs : tuple[str, ...]
        Those of ``forward_inputs`` derived from the token ids (``token_inputs_of``).
    add_special_tokens : bool
        Tokenize the prompt with the tokenizer's special tokens (False when the
        prompt text already holds them, e.g. a chat template).
    answer_separator : str
        Text between the prompt and the answer.
    prefix_lm : bool
        The prompt (image and question) attends to itself bidirectionally, only the
        answer is causal (PaliGemma).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    forward_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    image_inputs: ClassVar[tuple[str, ...]] = ()
    token_inputs: ClassVar[tuple[str, ...]] = ()
    add_special_tokens: ClassVar[bool] = True
    answer_separator: ClassVar[str] = " "
    prefix_lm: ClassVar[bool] = False

    @classmethod
    def matches(cls, config: Any) -> bool:
        """Whether a checkpoint ``config`` belongs to this family (by ``model_type``).

        Parameters
        ----------
        config : Any
            A transformers ``PretrainedConfig`` (top level).

        Returns
        -------
        bool
            True when ``config.model_type`` is one of ``model_types``.
        """
        return getattr(config, "model_type", None) in cls.model_types

    @abstractmethod
    def language_model(self, model: nn.Module) -> nn.Module:
        """Return the text decoder of ``model`` (a transformers model, not peft).

        Raises
        ------
        TypeError
            ``model`` does not have this family's layout.
        """

    @abstractmethod
    def vision_tower(self, model: nn.Module) -> nn.Module:
        """Return the image encoder of ``model`` (a transformers model, not peft).

        Raises
        ------
        TypeError
            ``model`` does not have this family's layout.
        """

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """Decoder layers of the language model, in order (default: ``.layers``)."""
        return list(self.language_model(model).layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Self-attention module of every decoder layer (default: ``.self_attn``)."""
        return [layer.self_attn for layer in self.decoder_layers(model)]

    def text_config(self, model: nn.Module) -> Any:
        """Config shared by the language model and its attention modules."""
        return self.language_model(model).config

    def image_token(self, processor: Any) -> str:
        """Placeholder token of one image in the prompt (default: ``image_token``)."""
        return str(processor.image_token)

    def attention_implementation(self, config: Any) -> str:
        """Attention implementation of the language model (default: ``"sdpa"``).

        The capture wraps it (``fed_asr.models.capture``); a family whose attention
        SDPA cannot compute (e.g. soft-capped logits) returns ``"eager"``.
        """
        return "sdpa"

    def prompt_text(self, processor: Any, template: str, question: str) -> str:
        """Prompt of one question with one image placeholder, as the family trained.

        Default: ``template.format(image=<image token>, question=question)``.
        """
        return template.format(image=self.image_token(processor), question=question)

    def encode_image(self, processor: Any, image: Any) -> EncodedImage:
        """Encode one image: its prompt tokens and its processor outputs.

        Default: the processor expands a prompt made of the placeholder alone.

        Parameters
        ----------
        processor : Any
            The checkpoint's processor.
        image : Any
            One ``PIL.Image``.

        Returns
        -------
        EncodedImage
            Token ids replacing the placeholder, and the ``image_inputs`` tensors.
        """
        encoded = processor(
            text=[self.image_token(processor)],
            images=[image],
            add_special_tokens=False,
            return_tensors="pt",
        )
        return EncodedImage(
            token_ids=[int(t) for t in encoded["input_ids"][0]],
            inputs={k: encoded[k] for k in self.image_inputs},
        )

    def collate_images(self, images: Sequence[EncodedImage]) -> dict[str, Tensor]:
        """Batch the image inputs of one image per row (default: concatenate)."""
        return {
            k: torch.cat([im.inputs[k] for im in images]) for k in self.image_inputs
        }

    def select_images(self, batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
        """Image inputs of the rows ``rows`` (1-D indices) of a collated batch.

        Default: index the first dimension of every image input.
        """
        return {
            k: batch[k][rows.to(batch[k].device)]
            for k in self.image_inputs
            if batch.get(k) is not None
        }

    def token_inputs_of(
        self, input_ids: Tensor, prompt_length: Tensor, image_token_id: int
    ) -> dict[str, Tensor]:
        """Return the inputs derived from the ids (``token_inputs``); default: none.

        Parameters
        ----------
        input_ids : Tensor
            (B, S) ids, each row its prompt then its answer (or candidate) tokens.
        prompt_length : Tensor
            (B,) prompt tokens of each row.
        image_token_id : int
            Id of the image tokens.
        """
        return {}

    def position_ids(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """Rope positions the model gives a right-padded batch: (..., B, S).

        Default: ``0..S-1`` in every row; families with offsets or multi-axis rope
        (M-RoPE) override it. Packed scoring continues the answer branches from the
        position of each prompt's last token.
        """
        batch_size, length = batch["input_ids"].shape
        positions = torch.arange(length, device=batch["input_ids"].device)
        return positions.expand(batch_size, length)

    def spans_of_batch(
        self, config: Any, batch: Mapping[str, Any]
    ) -> list[list[ImageSpan]]:
        """Image spans of every row of a collated batch (default: ``image_spans``).

        Families whose grids depend on the image (e.g. ``image_grid_thw``) override
        this; the capture calls it.
        """
        return self.image_spans(config, batch["input_ids"])

    def num_image_tokens(self, processor: Any, image: Any) -> int:
        """Return how many image tokens one image placeholder expands into.

        Parameters
        ----------
        processor : Any
            The checkpoint's processor.
        image : Any
            One ``PIL.Image`` (families with a fixed count may ignore it).

        Returns
        -------
        int
            Image tokens among those that replace one ``image_token`` in the input
            ids (default: counted in ``encode_image``).
        """
        token_id = processor.tokenizer.convert_tokens_to_ids(
            self.image_token(processor)
        )
        return self.encode_image(processor, image).token_ids.count(token_id)

    @abstractmethod
    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Return the image spans of every row of ``input_ids``.

        Parameters
        ----------
        config : Any
            The checkpoint's top-level config.
        input_ids : Tensor
            (B, S) token ids, image tokens already expanded.

        Returns
        -------
        list[list[ImageSpan]]
            One list per row, spans in order of position (empty without images).

        Raises
        ------
        ValueError
            The image tokens of a row do not form whole images of this family.
        """


MODEL_FAMILIES: dict[str, type[ModelFamily]] = {}


def register_model_family(name: str, cls: type[ModelFamily]) -> None:
    """Register a model family under ``name`` (``model.family`` picks it).

    Parameters
    ----------
    name : str
        Unique snake_case name.
    cls : type[ModelFamily]
        The family class (instantiated without arguments).

    Raises
    ------
    ValueError
        ``name`` is not snake_case or ``cls`` is not a ``ModelFamily`` subclass.
    KeyError
        ``name`` is already registered.
    """
    check_new_name(MODEL_FAMILIES, name, "model family")
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
        raise ValueError(f"Model family {name!r} must be a ModelFamily, got {cls!r}.")
    MODEL_FAMILIES[name] = cls


def model_family_names() -> list[str]:
    """Sorted names of the registered model families."""
    return sorted(MODEL_FAMILIES)


def get_model_family(name: str) -> ModelFamily:
    """Return an instance of the family registered as ``name``.

    Raises
    ------
    KeyError
        No family is registered as ``name`` (the message lists the choices).
    """
    return lookup(MODEL_FAMILIES, name, "model family")()


def infer_model_family(config: Any) -> str:
    """Name of the registered family that a checkpoint config belongs to.

    Parameters
    ----------
    config : Any
        A transformers ``PretrainedConfig`` (top level), e.g. ``model.config`` or
        ``AutoConfig.from_pretrained(path)``.

    Returns
    -------
    str
        The one registered family whose ``matches(config)`` is True.

    Raises
    ------
    ValueError
        No family, or more than one, matches; set ``model.family`` then.
    """
    model_type = getattr(config, "model_type", None)
    found = [n for n, cls in sorted(MODEL_FAMILIES.items()) if cls.matches(config)]
    if not found:
        known = {n: list(c.model_types) for n, c in sorted(MODEL_FAMILIES.items())}
        raise ValueError(
            f"No model family matches the checkpoint's `model_type` {model_type!r}; "
            f"known model types: {known}. Register a family for it or set "
            "`model.family`."
        )
    if len(found) > 1:
        raise ValueError(
            f"Model families {found} all match `model_type` {model_type!r}; set "
            "`model.family` to one of them."
        )
    return found[0]


def resolve_model_family(name: str | None, config: Any) -> ModelFamily:
    """The family ``name`` when given (forced), else the one inferred from ``config``.

    Parameters
    ----------
    name : str | None
        ``ModelConfig.family``.
    config : Any
        The checkpoint's top-level config.

    Returns
    -------
    ModelFamily
        An instance of the family.

    Raises
    ------
    KeyError
        ``name`` is not registered.
    ValueError
        ``name`` is None and the family cannot be inferred.
    """
    return get_model_family(infer_model_family(config) if name is None else name)
