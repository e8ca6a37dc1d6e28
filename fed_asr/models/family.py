"""Model families: where a multimodal LLM keeps its parts and its image tokens.

A ``ModelFamily`` tells the rest of ``fed_asr.models`` everything that depends on the
checkpoint's architecture: where the language model (its decoder layers and their
attention modules) and the vision tower live, how image tokens are laid out in the
input ids (spans, each with its token grid), how many tokens one image expands to in
the prompt, which processor outputs the forward pass takes, and which checkpoint
configs (``model_type``) belong to the family.

Families are registered by name, the way peft registers its tuners::

    register_model_family("llava", LlavaFamily)

The built-in families are registered in ``fed_asr.models.families``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
    """

    start: int
    end: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        if self.end - self.start != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"An image span of {self.end - self.start} tokens "
                f"[{self.start}, {self.end}) does not fit its grid {self.grid}."
            )


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
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    forward_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

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

    @abstractmethod
    def num_image_tokens(self, processor: Any, image: Any) -> int:
        """Return how many tokens one image token expands into in the prompt.

        Parameters
        ----------
        processor : Any
            The checkpoint's processor.
        image : Any
            One ``PIL.Image`` (families with a fixed count may ignore it).

        Returns
        -------
        int
            Tokens that replace one ``image_token`` in the input ids.
        """

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
