"""Per-skill *conditional* spectral prototypes: a skill's expected descriptor given
the image, fit by ridge regression on additive (federation-summable) statistics.

Why (docs/findings.md, "LoRA on q/k"): ASR holds every sample of a skill to one
prototype mean, and per-sample targets (``spectral_distill``) protect far more. A
conditional prototype sits between them: it is still a per-skill statistic the
clients pool, but its mean depends on the image, mu_s(phi) = xbar_s + B_s^T (phi -
m_s) / sd_s, with phi the frozen base model's features of the image
(``image_features``).

Statistics per skill s over its member samples (membership as ``SkillStats``:
p(s | question) > tau_skill), with phi~ = (phi, 1):
``G = sum phi~ phi~^T``, ``H = sum phi~ x^T``, ``Q = sum x^2`` (per dimension) and
``n``. Sums over clients are sums of these, so pooling needs no raw sample.
The fit standardises the features (their mean and standard deviation come from G),
solves the ridge system (R + ridge I) B = R_fx on the correlation matrix R, and keeps
the exact in-sample residual variance per dimension as the Mahalanobis variance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SEPARATOR = "|"  # statistic keys are "<skill>|<G, H, Q or n>"
PARTS = ("G", "H", "Q", "n")
_EPS = 1e-8


def image_features(image_hidden: Tensor, layout: bool = True) -> Tensor:
    """Features phi of each image from (B, P, d) hidden states of its tokens.

    The mean over the P image tokens (what the image shows) and, with ``layout``,
    the share of the tokens' L2 norms per token (where it is): (B, d [+ P]).
    """
    hidden = image_hidden.float()
    pooled = hidden.mean(1)  # (B, d)
    if not layout:
        return pooled
    norms = hidden.norm(dim=-1)  # (B, P)
    share = norms / norms.sum(1, keepdim=True).clamp_min(_EPS)
    return torch.cat([pooled, share], dim=1)


def conditional_sums(
    features: Tensor, descriptors: Tensor, members: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Additive statistics of one batch: ``<skill>|G, H, Q, n`` per member skill.

    Parameters
    ----------
    features : Tensor
        (B, F) image features phi.
    descriptors : Tensor
        (B, D) spectral descriptors x.
    members : Mapping[str, Tensor]
        Skill -> (B,) 0/1 membership of each row; skills without a member are left out.

    Returns
    -------
    dict[str, Tensor]
        float64 CPU sums.
    """
    phi = features.detach().to("cpu", torch.float64)
    x = descriptors.detach().to("cpu", torch.float64)
    phi1 = torch.cat([phi, torch.ones(len(phi), 1, dtype=torch.float64)], dim=1)
    sums: dict[str, Tensor] = {}
    for skill, member in members.items():
        m = member.detach().to("cpu", torch.float64)
        if float(m.sum()) <= 0:
            continue
        weighted = phi1 * m[:, None]  # (B, F+1)
        sums[f"{skill}{SEPARATOR}G"] = weighted.T @ phi1
        sums[f"{skill}{SEPARATOR}H"] = weighted.T @ x
        sums[f"{skill}{SEPARATOR}Q"] = (m[:, None] * x.square()).sum(0)
        sums[f"{skill}{SEPARATOR}n"] = m.sum().reshape(1)
    return sums


def add_sums(parts: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Sum statistics skill by skill (float64).

    A skill's four parts are added only from sums that carry all four with the
    shapes of the first sum that has the skill; any other sum's entries for that
    skill are ignored (a malformed reply cannot break the fit of the others).
    """
    total: dict[str, Tensor] = {}
    for sums in parts:
        for skill in skills_of(sums):
            keys = [f"{skill}{SEPARATOR}{p}" for p in PARTS]
            values = [torch.as_tensor(sums[k]).double() for k in keys]
            if keys[0] in total and any(
                total[k].shape != v.shape for k, v in zip(keys, values, strict=True)
            ):
                continue
            for key, value in zip(keys, values, strict=True):
                total[key] = total[key] + value if key in total else value.clone()
    return total


def sums_reason(sums: Mapping[str, Tensor]) -> str | None:
    """Why one client's statistics are not a valid set of sums, or None.

    Every key is ``<skill>|<part>``, every skill has all four parts, shaped
    G (F+1, F+1), H (F+1, D), Q (D,), n (1,) with one F and one D, and the parts
    agree with being sums of squares over n samples (n >= 0, G's corner = n, Q and
    G's diagonal >= 0).
    """
    sizes: set[tuple[int, int]] = set()
    for key in sorted(sums):
        skill, _, part = key.rpartition(SEPARATOR)
        if not skill or part not in PARTS:
            return f"unexpected key `{key}` (expected `<skill>{SEPARATOR}<G|H|Q|n>`)"
    complete = set(skills_of(sums))
    for skill in sorted({k.rpartition(SEPARATOR)[0] for k in sums}):
        if skill not in complete:
            return f"skill `{skill}` lacks some of the parts {list(PARTS)}"
        g, h, q, n = (torch.as_tensor(sums[f"{skill}{SEPARATOR}{p}"]) for p in PARTS)
        k, d = (h.shape[0], h.shape[1]) if h.dim() == 2 else (0, 0)
        shapes = (tuple(g.shape), tuple(h.shape), tuple(q.shape), tuple(n.shape))
        if k < 2 or d < 1 or shapes != ((k, k), (k, d), (d,), (1,)):
            return f"skill `{skill}` has part shapes {shapes} (G, H, Q, n)"
        sizes.add((k, d))
        count, corner = float(n[0]), float(g[-1, -1])
        if count < 0 or abs(corner - count) > 1e-6 * max(1.0, count):
            return f"skill `{skill}`: n = {count:g} but G's corner is {corner:g}"
        if bool((q < 0).any()) or bool((g.diagonal() < 0).any()):
            return f"skill `{skill}`: negative sums of squares"
    if len(sizes) > 1:
        return f"the skills' sizes (F+1, D) differ: {sorted(sizes)}"
    return None


def skills_of(sums: Mapping[str, Tensor]) -> list[str]:
    """Skills with all four parts in ``sums``, sorted."""
    found: dict[str, set[str]] = {}
    for key in sums:
        skill, _, part = key.rpartition(SEPARATOR)
        if skill and part in PARTS:
            found.setdefault(skill, set()).add(part)
    return sorted(s for s, parts in found.items() if parts == set(PARTS))


@dataclass(frozen=True)
class ConditionalPrototype:
    """A skill's fitted prototype: mean xbar + ((phi - m) / sd) @ coef, variance var."""

    feature_mean: Tensor  # (F,)
    feature_sd: Tensor  # (F,)
    descriptor_mean: Tensor  # (D,)
    coef: Tensor  # (F, D)
    var: Tensor  # (D,) residual variance, floored
    count: float
    explained: float  # 1 - mean residual / mean marginal variance (in-sample R^2)

    def predict(self, features: Tensor) -> Tensor:
        """(B, F) features -> (B, D) expected descriptors."""
        z = (features.float() - self.feature_mean) / self.feature_sd
        return self.descriptor_mean + z @ self.coef

    def to(self, device: torch.device | str) -> ConditionalPrototype:
        """A float32 copy on ``device``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device, torch.float32)

        return ConditionalPrototype(
            move(self.feature_mean),
            move(self.feature_sd),
            move(self.descriptor_mean),
            move(self.coef),
            move(self.var),
            self.count,
            self.explained,
        )


def fit_prototype(
    sums: Mapping[str, Tensor], skill: str, ridge: float, floor: float
) -> ConditionalPrototype | None:
    """Ridge fit of ``skill``'s prototype from its statistics (None without samples).

    ``ridge`` is added to the diagonal of the features' correlation matrix; ``floor``
    bounds the residual variance from below (``regularizer.cov_floor``).
    """
    g, h, q, n = (
        torch.as_tensor(sums[f"{skill}{SEPARATOR}{p}"]).double() for p in PARTS
    )
    count = float(n.reshape(-1)[0])
    if count <= 0:
        return None
    m = g[:-1, -1] / count  # (F,)
    xbar = h[-1] / count  # (D,)
    c_ff = g[:-1, :-1] / count - torch.outer(m, m)  # (F, F)
    c_fx = h[:-1] / count - torch.outer(m, xbar)  # (F, D)
    var_x = (q / count - xbar.square()).clamp_min(0.0)  # (D,)
    sd = c_ff.diagonal().clamp_min(0.0).sqrt().clamp_min(1e-6)  # (F,)
    corr = c_ff / torch.outer(sd, sd)
    r_fx = c_fx / sd[:, None]
    eye = torch.eye(len(sd), dtype=torch.float64)
    coef = torch.linalg.solve(corr + ridge * eye, r_fx)  # (F, D)
    resid = var_x - 2 * (coef * r_fx).sum(0) + (coef * (corr @ coef)).sum(0)
    resid = resid.clamp_min(0.0)
    explained = 1.0 - float(resid.sum() / var_x.sum().clamp_min(_EPS))
    return ConditionalPrototype(
        m.float(),
        sd.float(),
        xbar.float(),
        coef.float(),
        resid.clamp_min(floor).float(),
        count,
        explained,
    )


def fit_prototypes(
    sums: Mapping[str, Tensor], skills: Sequence[str], ridge: float, floor: float
) -> dict[str, ConditionalPrototype]:
    """Fitted prototypes of those ``skills`` that have statistics."""
    have = set(skills_of(sums))
    fitted = {}
    for skill in skills:
        if skill in have:
            proto = fit_prototype(sums, skill, ridge, floor)
            if proto is not None:
                fitted[skill] = proto
    return fitted
