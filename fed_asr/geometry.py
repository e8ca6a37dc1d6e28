"""The geometry term L_geo of ASR (DESIGN section 2), in two variants.

``"paper"`` (default, the paper's code): pool the image tokens and the text tokens of
the last hidden layer into one image and one text embedding per sample, take the
batch's B x B cosine similarities (image i vs text j), softmax each row at
temperature 1 and compare current and reference rows by symmetric KL. Its gradient
is small (about 2e-4 of the task gradient, DESIGN section 2).

``"token"`` (this project's earlier variant): per sample, the T x P cosine
similarities of text tokens to image tokens, softmaxed over the image tokens at
temperature 0.1. A far stronger regularizer (0.08-0.28 of the task gradient).

The reference is the base model with the LoRA adapters disabled. It is frozen, so a
sample's reference is a constant: the token variant caches its (T, P) rows, the
paper variant its pooled embeddings (``pack_pooled`` / ``unpack_pooled`` turn them
into the (B, 1, 2H) rows ``fed_asr.reference_cache.ReferenceCache`` stores).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_asr.config_sections import check_choice, check_positive
from fed_asr.reference_cache import ReferenceCache

__all__ = [
    "GEOMETRY_VARIANTS",
    "SYM_KL_REDUCTIONS",
    "batch_geometry_loss",
    "batch_log_similarity",
    "cached_pooled_reference",
    "geometry_loss",
    "geometry_loss_from_reference",
    "pack_pooled",
    "pooled_embeddings",
    "reference_log_similarity",
    "symmetric_kl_from_log",
    "unpack_pooled",
]

GEOMETRY_VARIANTS = ("paper", "token")
SYM_KL_REDUCTIONS = ("mean", "sum")


def symmetric_kl_from_log(
    log_p: Tensor, log_q: Tensor, reduction: str = "mean"
) -> Tensor:
    """Symmetric KL of two log-distributions over the last dimension.

    Parameters
    ----------
    log_p, log_q : Tensor
        Log-probabilities of the same shape.
    reduction : str
        ``"mean"`` (paper): 0.5 (KL(p||q) + KL(q||p)); ``"sum"``: KL(p||q) + KL(q||p).

    Returns
    -------
    Tensor
        The divergence, one value per leading index.

    Raises
    ------
    ValueError
        If ``reduction`` is unknown.
    """
    check_choice("reduction", reduction, SYM_KL_REDUCTIONS)
    both = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
    return 0.5 * both if reduction == "mean" else both


def pooled_embeddings(
    image_hidden: Tensor, text_hidden: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean-pool image tokens and the masked text tokens of each sample.

    Parameters
    ----------
    image_hidden : Tensor
        (B, P, H) last-layer hidden states of the image tokens.
    text_hidden : Tensor
        (B, T, H) last-layer hidden states of the text rows.
    mask : Tensor | None
        (B, T), non-zero on the text tokens to pool (e.g. the prompt's
        ``query_mask``); ``None`` pools every row. A row with an empty mask gives a
        zero text embedding (cosine similarity 0 to every image).

    Returns
    -------
    tuple[Tensor, Tensor]
        ``img`` (B, H) and ``txt`` (B, H), float32.

    Raises
    ------
    ValueError
        If the shapes do not agree.
    """
    if image_hidden.ndim != 3 or text_hidden.ndim != 3:
        raise ValueError(
            "`image_hidden` and `text_hidden` must be (B, P, H) and (B, T, H), got "
            f"{tuple(image_hidden.shape)} and {tuple(text_hidden.shape)}."
        )
    img = image_hidden.float().mean(dim=1)  # (B, H)
    text = text_hidden.float()
    if mask is None:
        return img, text.mean(dim=1)
    if mask.shape != text.shape[:2]:
        raise ValueError(
            f"`mask` must have shape {tuple(text.shape[:2])}, got {tuple(mask.shape)}."
        )
    weights = (mask != 0).to(device=text.device, dtype=text.dtype)  # (B, T)
    total = weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
    txt = torch.einsum("bth,bt->bh", text, weights) / total  # (B, H)
    return img, txt


def batch_log_similarity(img: Tensor, txt: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, B) row log-softmax of cos(img_i, txt_j) / ``temperature``."""
    check_positive("temperature", temperature)
    img = F.normalize(img.float(), dim=-1)  # (B, H)
    txt = F.normalize(txt.float(), dim=-1)  # (B, H)
    return F.log_softmax(img @ txt.T / temperature, dim=-1)  # (B, B)


def batch_geometry_loss(
    cur_img: Tensor,
    cur_txt: Tensor,
    ref_img: Tensor,
    ref_txt: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """The paper's L_geo: symmetric KL of the batch image-to-text similarity rows.

    Parameters
    ----------
    cur_img, cur_txt : Tensor
        (B, H) pooled embeddings of the model being trained (``pooled_embeddings``).
    ref_img, ref_txt : Tensor
        (B, H) the same from the reference model (detached here).
    temperature : float
        Softmax temperature (positive; 1 in the paper).
    reduction : str
        Symmetric KL with (``"mean"``) or without (``"sum"``) the 1/2.

    Returns
    -------
    Tensor
        Scalar float32 loss: the mean over the B rows of symKL(softmax(S_cur[i]),
        softmax(S_ref[i])) with S[i, j] = cos(img_i, txt_j); 0 when B = 1.

    Raises
    ------
    ValueError
        If shapes differ, ``temperature`` is not positive or ``reduction`` unknown.
    """
    shapes = {tuple(t.shape) for t in (cur_img, cur_txt, ref_img, ref_txt)}
    if len(shapes) != 1 or cur_img.ndim != 2:
        raise ValueError(
            "Pooled embeddings must all have the same (B, H) shape, got "
            f"{[tuple(t.shape) for t in (cur_img, cur_txt, ref_img, ref_txt)]}."
        )
    log_cur = batch_log_similarity(cur_img, cur_txt, temperature)  # (B, B)
    with torch.no_grad():
        log_ref = batch_log_similarity(ref_img.detach(), ref_txt.detach(), temperature)
    return symmetric_kl_from_log(log_cur, log_ref.to(log_cur), reduction).mean()


def pack_pooled(img: Tensor, txt: Tensor) -> Tensor:
    """(B, 1, 2H) rows holding ``[img, txt]``, the shape ``ReferenceCache`` stores."""
    return torch.cat([img, txt], dim=-1)[:, None, :]


def unpack_pooled(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_pooled``: (B, 1, 2H) -> ``img`` (B, H), ``txt`` (B, H)."""
    flat = packed[:, 0, :]  # (B, 2H)
    half = flat.shape[-1] // 2
    return flat[:, :half], flat[:, half:]


def cached_pooled_reference(
    cache: ReferenceCache | None,
    keys: Sequence[Hashable],
    compute: Callable[[], tuple[Tensor, Tensor]],
    batch_size: int,
    hidden_size: int,
    device: torch.device | str,
) -> tuple[Tensor, Tensor]:
    """The reference's pooled embeddings of a batch, from ``cache`` when possible.

    Parameters
    ----------
    cache : ReferenceCache | None
        Per-sample cache (``None`` or ``max_entries=0``: always ``compute``).
    keys : Sequence[Hashable]
        One key per batch row; with any other count nothing is cached.
    compute : Callable[[], tuple[Tensor, Tensor]]
        Runs the reference model (no grad, adapters disabled) and returns
        ``pooled_embeddings`` of its hidden states: ``img``, ``txt`` (B, H).
    batch_size : int
        B.
    hidden_size : int
        H.
    device : torch.device | str
        Where a cached batch is returned.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``img`` and ``txt`` (B, H) of the reference, detached.
    """
    use_cache = cache is not None and len(keys) == batch_size > 0
    rows = torch.ones(batch_size, 1, dtype=torch.bool, device=device)  # (B, 1)
    if use_cache:
        assert cache is not None
        hit = cache.lookup(keys, rows, 2 * hidden_size)  # (B, 1, 2H) or None
        if hit is not None:
            return unpack_pooled(hit)
    img, txt = compute()
    img, txt = img.detach(), txt.detach()
    if use_cache and img.shape[0] == batch_size:
        assert cache is not None
        cache.store(keys, pack_pooled(img, txt), rows)
    return img, txt


def geometry_loss(
    image_cur: Tensor,
    text_cur: Tensor,
    image_ref: Tensor,
    text_ref: Tensor,
    text_mask: Tensor,
    temperature: float,
    reduction: str = "mean",
) -> Tensor:
    """The token variant: symKL between current and reference (T, P) similarity rows.

    For each sample, S = cos(text_t, image_p) (T, P); each row is softmaxed over the
    image tokens at ``temperature``; the loss is the symmetric KL per row, averaged
    over the valid text rows of the batch. The reference is detached.

    Parameters
    ----------
    image_cur, text_cur : Tensor
        (B, P, d) and (B, T, d) hidden states of the model being trained.
    image_ref, text_ref : Tensor
        The same from the reference model (e.g. the base model, adapters disabled).
    text_mask : Tensor
        (B, T), non-zero for the text rows to use.
    temperature : float
        Softmax temperature (positive).
    reduction : str
        Symmetric KL with (``"mean"``) or without (``"sum"``) the 1/2.

    Returns
    -------
    Tensor
        Scalar float32 loss; zero (connected to the inputs) when no row is valid.

    Raises
    ------
    ValueError
        If shapes disagree or ``temperature`` is not positive.
    """
    check_positive("temperature", temperature)
    if image_cur.shape != image_ref.shape or text_cur.shape != text_ref.shape:
        raise ValueError(
            f"Current and reference shapes differ: image {tuple(image_cur.shape)} vs "
            f"{tuple(image_ref.shape)}, text {tuple(text_cur.shape)} vs "
            f"{tuple(text_ref.shape)}."
        )
    if text_mask.shape != text_cur.shape[:2]:
        raise ValueError(
            f"`text_mask` must have shape {tuple(text_cur.shape[:2])}, "
            f"got {tuple(text_mask.shape)}."
        )
    with torch.no_grad():
        log_ref = reference_log_similarity(
            image_ref.detach(), text_ref.detach(), temperature
        )
    return geometry_loss_from_reference(
        image_cur, text_cur, log_ref, text_mask, temperature, reduction
    )


def reference_log_similarity(image: Tensor, text: Tensor, temperature: float) -> Tensor:
    """(B, T, P) log of the row-softmaxed text-to-image cosine similarities.

    For a frozen reference model this is a constant of each sample, so callers may
    compute it once and reuse it (see ``geometry_loss_from_reference``).
    """
    check_positive("temperature", temperature)
    image = F.normalize(image.float(), dim=-1)  # (B, P, d)
    text = F.normalize(text.float(), dim=-1)  # (B, T, d)
    sim = text @ image.transpose(1, 2)  # (B, T, P)
    return F.log_softmax(sim / temperature, dim=-1)


def geometry_loss_from_reference(
    image_cur: Tensor,
    text_cur: Tensor,
    log_ref: Tensor,
    text_mask: Tensor,
    temperature: float,
    reduction: str = "mean",
) -> Tensor:
    """``geometry_loss`` with the reference given as log-similarity rows (B, T, P)."""
    if log_ref.shape != (*text_cur.shape[:2], image_cur.shape[1]):
        raise ValueError(
            f"`log_ref` must have shape {(*text_cur.shape[:2], image_cur.shape[1])}, "
            f"got {tuple(log_ref.shape)}."
        )
    log_cur = reference_log_similarity(image_cur, text_cur, temperature)  # (B, T, P)
    log_ref = log_ref.detach().to(log_cur)
    kl = symmetric_kl_from_log(log_cur, log_ref, reduction)  # (B, T)
    mask = (text_mask != 0).to(device=kl.device, dtype=kl.dtype)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)
