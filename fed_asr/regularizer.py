"""Attention-Spectrum Regularization loss and the geometry term (DESIGN section 2).

``ASRRegularizer`` returns L_spec only; the training loop applies the weights:
L = L_task + beta * L_spec + gamma * L_geo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum import SkillSpectrum

__all__ = ["ASRLoss", "ASRRegularizer", "geometry_loss", "symmetric_kl"]

_EPS = 1e-8


@dataclass
class ASRLoss:
    """Result of one regularizer call.

    Attributes
    ----------
    loss : Tensor
        Scalar L_spec, differentiable w.r.t. the descriptors.
    mahalanobis : Tensor
        Scalar, detached: mean over active samples of sum_s p~ d2_s.
    angular : Tensor
        Scalar, detached: mean over active samples of sum_s p~ symKL(a, a_s).
    weight : Tensor
        Scalar, detached: mean confidence weight w(x) over active samples.
    active_fraction : Tensor
        Scalar, detached: fraction of the batch with some active skill.
    """

    loss: Tensor
    mahalanobis: Tensor
    angular: Tensor
    weight: Tensor
    active_fraction: Tensor


def symmetric_kl(p: Tensor, q: Tensor, eps: float = _EPS) -> Tensor:
    """KL(p||q) + KL(q||p) = sum (p - q)(log p - log q) over the last dimension."""
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    return ((p - q) * (p.log() - q.log())).sum(-1)


class ASRRegularizer:
    """Spectral regularizer against the per-skill prototypes of a ``SkillSpectrum``.

    For descriptor x (D,), angular a(x) (M,) and skill probabilities p (S,):

    - d2_s = sum_j (x_j - mu_s,j)^2 / var_s,j / D for each skill s with a prototype;
    - p~ = p restricted to skills with a prototype, renormalised; a sample is active
      when its restricted mass is positive;
    - w(x) = exp(-min_s d2_s / tau_mah), min over all skills with a prototype;
    - L_spec = mean over active samples of w (sum_s p~ d2_s
      + lambda_ang sum_s p~ symKL(a, a_s)).

    w is detached: it is a per-sample weight, not a target. Were gradients to flow
    through it, the cheapest way to lower w * d2 would be to push the descriptor
    *away* from every prototype (lowering w), the opposite of the regularizer's
    purpose. Detached, it only down-weights samples far from all known prototypes,
    whose gradient always points towards the prototypes.

    Parameters
    ----------
    cfg : RegularizerConfig
        Reads ``lambda_ang`` and ``tau_mah``.
    spectrum : SkillSpectrum | None
        The prototypes; ``None`` gives a zero loss until ``set_spectrum``.
    """

    def __init__(self, cfg: RegularizerConfig, spectrum: SkillSpectrum | None) -> None:
        self.cfg = cfg
        self.spectrum: SkillSpectrum | None = None
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self.set_spectrum(spectrum)

    def set_spectrum(self, spectrum: SkillSpectrum | None) -> None:
        """Use ``spectrum`` as the prototypes from now on (``None`` disables)."""
        self.spectrum = spectrum
        self._cache = {}

    def to(self, device: torch.device | str) -> ASRRegularizer:
        """Prepare the prototypes on ``device`` (done lazily on first use otherwise)."""
        if self.spectrum is not None and bool(self.spectrum.present.any()):
            self._prototypes(torch.device(device))
        return self

    def _prototypes(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """float32 (mean, var, angular) of the present skills on ``device``."""
        if device not in self._cache:
            assert self.spectrum is not None
            present = self.spectrum.present.cpu()
            spec = self.spectrum.to("cpu", torch.float32)
            self._cache[device] = (
                spec.mean[present].to(device),  # (S', D)
                spec.var[present].to(device),  # (S', D)
                spec.angular[present].to(device),  # (S', M)
            )
        return self._cache[device]

    def __call__(self, desc: SpectralDescriptor, skill_probs: Tensor) -> ASRLoss:
        """Compute L_spec for a batch.

        Parameters
        ----------
        desc : SpectralDescriptor
            (B, D) descriptors and (B, M) angular distributions.
        skill_probs : Tensor
            (B, S) skill probabilities, columns in the spectrum's skill order.

        Returns
        -------
        ASRLoss
            ``loss`` is a zero scalar still connected to ``desc`` when no prototype
            is active for any sample (or there is no spectrum).

        Raises
        ------
        ValueError
            If the shapes do not match the spectrum.
        """
        x = desc.descriptor.float()  # (B, D)
        a = desc.angular.float()  # (B, M)
        zero = x.new_zeros(())
        spectrum = self.spectrum
        if spectrum is None or not bool(spectrum.present.any()):
            return ASRLoss(_zero_like_graph(x, a), zero, zero, zero, zero)
        b, d = x.shape
        if d != spectrum.dim or a.shape[-1] != spectrum.n_angular:
            raise ValueError(
                f"Descriptor sizes (D, M) = {(d, a.shape[-1])} do not match the "
                f"spectrum's {(spectrum.dim, spectrum.n_angular)}."
            )
        if tuple(skill_probs.shape) != (b, len(spectrum.skills)):
            raise ValueError(
                f"`skill_probs` must have shape {(b, len(spectrum.skills))}, "
                f"got {tuple(skill_probs.shape)}."
            )
        mu, var, proto_ang = self._prototypes(x.device)
        present = spectrum.present.to(skill_probs.device)
        probs = skill_probs.float()[:, present].to(x.device)  # (B, S')
        mass = probs.sum(1, keepdim=True)  # (B, 1)
        active = (mass[:, 0] > 0).float()  # (B,)
        p_tilde = probs / mass.clamp_min(_EPS)  # (B, S'), rows of inactive are 0

        diff = x[:, None, :] - mu[None]  # (B, S', D)
        d2 = (diff.square() / var[None]).sum(-1) / d  # (B, S')
        maha = (p_tilde * d2).sum(1)  # (B,)
        kl = symmetric_kl(a[:, None, :], proto_ang[None])  # (B, S')
        ang = (p_tilde * kl).sum(1)  # (B,)
        w = torch.exp(-d2.min(dim=1).values.detach() / self.cfg.tau_mah)  # (B,)

        n_active = active.sum().clamp_min(1.0)
        per_sample = w * (maha + self.cfg.lambda_ang * ang)  # (B,)
        loss = (active * per_sample).sum() / n_active

        def batch_mean(v: Tensor) -> Tensor:
            return ((active * v).sum() / n_active).detach()

        return ASRLoss(
            loss=loss,
            mahalanobis=batch_mean(maha),
            angular=batch_mean(ang),
            weight=batch_mean(w),
            active_fraction=active.mean().detach(),
        )


def geometry_loss(
    image_cur: Tensor,
    text_cur: Tensor,
    image_ref: Tensor,
    text_ref: Tensor,
    text_mask: Tensor,
    temperature: float,
) -> Tensor:
    """Symmetric KL between current and reference text-to-image similarity rows.

    For each sample, S = cos(text_t, image_p) (T, P); each row is softmaxed over the
    image tokens at ``temperature``; the loss is sum_p (P - R)(log P - log R) per row,
    averaged over the valid text rows of the batch. The reference is detached.

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

    Returns
    -------
    Tensor
        Scalar float32 loss; zero (connected to the inputs) when no row is valid.

    Raises
    ------
    ValueError
        If shapes disagree or ``temperature`` is not positive.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
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
        image_cur, text_cur, log_ref, text_mask, temperature
    )


def reference_log_similarity(image: Tensor, text: Tensor, temperature: float) -> Tensor:
    """(B, T, P) log of the row-softmaxed text-to-image cosine similarities.

    For a frozen reference model this is a constant of each sample, so callers may
    compute it once and reuse it (see ``geometry_loss_from_reference``).
    """
    return _row_log_softmax(image, text, temperature)


def geometry_loss_from_reference(
    image_cur: Tensor,
    text_cur: Tensor,
    log_ref: Tensor,
    text_mask: Tensor,
    temperature: float,
) -> Tensor:
    """``geometry_loss`` with the reference given as log-similarity rows (B, T, P)."""
    if log_ref.shape != (*text_cur.shape[:2], image_cur.shape[1]):
        raise ValueError(
            f"`log_ref` must have shape {(*text_cur.shape[:2], image_cur.shape[1])}, "
            f"got {tuple(log_ref.shape)}."
        )
    log_cur = _row_log_softmax(image_cur, text_cur, temperature)  # (B, T, P)
    log_ref = log_ref.detach().to(log_cur)
    kl = ((log_cur.exp() - log_ref.exp()) * (log_cur - log_ref)).sum(-1)  # (B, T)
    mask = (text_mask != 0).to(device=kl.device, dtype=kl.dtype)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _row_log_softmax(image: Tensor, text: Tensor, temperature: float) -> Tensor:
    """(B, T, P) log-softmax over image tokens of cosine similarities / temperature."""
    image = F.normalize(image.float(), dim=-1)  # (B, P, d)
    text = F.normalize(text.float(), dim=-1)  # (B, T, d)
    sim = text @ image.transpose(1, 2)  # (B, T, P)
    return F.log_softmax(sim / temperature, dim=-1)


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """Zero scalar that backpropagates (zeros) into ``tensors`` needing grad."""
    connected = [t for t in tensors if t.requires_grad]
    if not connected:
        return torch.zeros((), device=tensors[0].device, requires_grad=True)
    total = connected[0].sum()
    for t in connected[1:]:
        total = total + t.sum()
    return total * 0.0
