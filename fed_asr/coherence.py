"""Where attention sits relative to the image's content: the coherence spectrum.

A power spectrum is blind to where a map sits (``fed_asr.spectral``: shifting a map
leaves it unchanged), so it cannot see attention that leaves the object a question is
about. The coherence spectrum keeps one thing about position that is not per-image:
how the attention map lines up with the image's own content.

- The **content map** of an image is, per patch of the vision tower's grid, the mean
  distance of its pixels from the image's median colour (``content_maps``): the object
  on a plain background, the salient regions of a photograph. It is computed from the
  processed ``pixel_values`` the vision tower sees, so it needs no labels and no boxes.
- The **coherence** of an attention map A with a content map C in radial frequency
  band b is the correlation of the two maps band-pass filtered to b:
  ``sum_{k in b} Re(F_A(k) conj(F_C(k))) / sqrt(sum_{k in b} |F_A|^2 sum_{k in b}
  |F_C|^2)``, in [-1, 1], with the DC term left out (every normalised map has the same
  DC). Over all bands together it is the Pearson correlation of A and C over the
  patches (Parseval). Shifting both maps together leaves it unchanged; attention that
  moves off the content lowers it.

``coherence_descriptor`` gives, per sample, the mean and population variance over the
layer-heads of the K band coherences, (B, 2K), the same layout as the spectral
descriptor; or, per head, every layer-head's K coherences, (B, J * K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_asr.config_sections import check_positive
from fed_asr.spectral import attention_maps, frequency_coordinates, pool_layer_heads

_EPS = 1e-12


def content_maps(pixel_values: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, Gh, Gw) content per patch: mean pixel distance from the median colour.

    Parameters
    ----------
    pixel_values : Tensor
        (B, C, H, W) processed images (any normalisation; distances are taken in it).
    grid : tuple[int, int]
        (Gh, Gw) patch grid of the vision tower; H and W are pooled onto it.

    Returns
    -------
    Tensor
        float32, non-negative; an image of one colour gives an all-zero map.

    Raises
    ------
    ValueError
        ``pixel_values`` is not 4-D (a family whose processor flattens patches).
    """
    if pixel_values.dim() != 4:
        raise ValueError(
            "content maps need (B, C, H, W) pixel values, got shape "
            f"{tuple(pixel_values.shape)}."
        )
    pixels = pixel_values.detach().float()
    median = pixels.flatten(2).median(dim=-1).values  # (B, C)
    distance = (pixels - median[:, :, None, None]).square().sum(dim=1).sqrt()
    return F.adaptive_avg_pool2d(distance[:, None], grid)[:, 0]  # (B, Gh, Gw)


def _band_index(grid: tuple[int, int], n_bands: int, device: torch.device) -> Tensor:
    """(Gh, Gw) band of every frequency, -1 for DC (``floor(rho * K)``, capped)."""
    rho, _ = frequency_coordinates(*grid, device=device)
    band = (rho * n_bands).floor().long().clamp(max=n_bands - 1)
    return torch.where(rho > 0, band, torch.full_like(band, -1))


def band_coherence(maps: Tensor, content: Tensor, n_bands: int) -> Tensor:
    """(B, J, K) coherence of each map with its image's content per radial band.

    Parameters
    ----------
    maps : Tensor
        (B, J, Gh, Gw) attention maps.
    content : Tensor
        (B, Gh, Gw) content maps (``content_maps``).
    n_bands : int
        Number K of radial bands (``regularizer.n_radial``).

    Returns
    -------
    Tensor
        Values in [-1, 1]; 0 for a band where either map has no power.
    """
    check_positive("n_bands", n_bands)
    grid = (maps.shape[-2], maps.shape[-1])
    spec_a = torch.fft.fft2(maps.float(), norm="ortho")  # (B, J, Gh, Gw)
    spec_c = torch.fft.fft2(content.float(), norm="ortho")[:, None]  # (B, 1, Gh, Gw)
    cross = (spec_a * spec_c.conj()).real
    power_a, power_c = spec_a.abs().square(), spec_c.abs().square()
    band = _band_index(grid, n_bands, maps.device)
    onehot = (band[..., None] == torch.arange(n_bands, device=maps.device)).float()
    per_band = [
        torch.einsum("bjhw,hwk->bjk", x, onehot) for x in (cross, power_a, power_c)
    ]
    cross_b, power_ab, power_cb = per_band
    scale = (power_ab * power_cb).clamp_min(_EPS).sqrt()
    return torch.where(power_ab * power_cb > _EPS, cross_b / scale, 0.0)


def coherence_descriptor(
    attn: Tensor,
    grid: tuple[int, int],
    pixel_values: Tensor,
    token_weights: Tensor | None = None,
    n_bands: int = 8,
    per_head: bool = False,
) -> Tensor:
    """(B, 2K) mean then variance over layer-heads of the band coherences.

    With ``per_head`` the coherences of every layer-head instead, (B, J * K).

    Parameters
    ----------
    attn : Tensor
        (B, L, H, Tq, P) text-to-image attention (a capture's ``attn``).
    grid : tuple[int, int]
        (Gh, Gw) with Gh * Gw = P.
    pixel_values : Tensor
        (B, C, H, W) the batch's processed images.
    token_weights : Tensor | None
        (B, Tq) query-token weights (``fed_asr.query_tokens``).
    n_bands : int
        Number K of radial bands.
    per_head : bool
        Keep each layer-head's coherences instead of pooling them.
    """
    maps = attention_maps(attn, grid, token_weights)  # (B, J, Gh, Gw)
    coherence = band_coherence(maps, content_maps(pixel_values, grid), n_bands)
    return coherence.flatten(1) if per_head else pool_layer_heads(coherence)
