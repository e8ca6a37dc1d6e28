"""Tests of fed_asr.spectrum: skill statistics, prototypes, blending, I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum import SkillSpectrum, SkillStats, blend, sum_stats

SKILLS = ("color", "count", "shape")


def make_desc(n: int, dim: int = 6, m: int = 4) -> SpectralDescriptor:
    """Random descriptors (n, dim) and angular distributions (n, m)."""
    return SpectralDescriptor(torch.randn(n, dim), torch.rand(n, m).softmax(-1))


def make_probs(n: int) -> torch.Tensor:
    """Random skill probabilities (n, 3)."""
    return torch.rand(n, len(SKILLS)).mul(4.0).softmax(-1)


def make_spectrum(mean: float, var: float, count: list[float]) -> SkillSpectrum:
    """Spectrum over SKILLS with constant mean/var, D = 2, M = 2."""
    s = len(SKILLS)
    return SkillSpectrum(
        SKILLS,
        torch.full((s, 2), mean, dtype=torch.float64),
        torch.full((s, 2), var, dtype=torch.float64),
        torch.tensor([[0.5, 0.5]] * s, dtype=torch.float64),
        torch.tensor(count, dtype=torch.float64),
    )


def test_skill_stats_from_batch_counts_samples_above_tau() -> None:
    # Prepare
    desc = make_desc(3)
    probs = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])

    # Execute
    stats = SkillStats.from_batch(desc, probs, SKILLS, tau_skill=0.2)

    # Assert
    x = desc.descriptor.double()
    torch.testing.assert_close(stats.count, torch.tensor([1.0, 1.0, 2.0]).double())
    torch.testing.assert_close(stats.sum[0], x[0])
    torch.testing.assert_close(stats.sumsq[2], x[1].square() + x[2].square())
    assert stats.sum.dtype == torch.float64 and stats.sum.device.type == "cpu"


def test_skill_stats_from_batch_wrong_probs_shape_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`skill_probs` must have shape"):
        SkillStats.from_batch(make_desc(4), torch.rand(4, 2), SKILLS, 0.2)


def test_skill_stats_merge_equals_stats_of_concatenated_data() -> None:
    # Prepare
    d1, d2 = make_desc(7), make_desc(5)
    p1, p2 = make_probs(7), make_probs(5)
    joint = SpectralDescriptor(
        torch.cat([d1.descriptor, d2.descriptor]), torch.cat([d1.angular, d2.angular])
    )

    # Execute
    merged = SkillStats.from_batch(d1, p1, SKILLS, 0.2) + SkillStats.from_batch(
        d2, p2, SKILLS, 0.2
    )
    direct = SkillStats.from_batch(joint, torch.cat([p1, p2]), SKILLS, 0.2)

    # Assert
    for name in ("count", "sum", "sumsq", "angular_sum"):
        torch.testing.assert_close(
            getattr(merged, name), getattr(direct, name), atol=1e-6, rtol=0
        )


def test_skill_stats_add_different_skills_raises() -> None:
    # Prepare
    a = SkillStats.empty(SKILLS, 6, 4)
    b = SkillStats.empty(("color", "count", "size"), 6, 4)

    # Execute / Assert
    with pytest.raises(ValueError, match="Cannot merge statistics of skills"):
        _ = a + b


def test_sum_stats_empty_list_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`stats` must hold at least one"):
        sum_stats([])


def test_to_prototypes_matches_torch_mean_and_var() -> None:
    # Prepare
    desc = make_desc(50)
    probs = make_probs(50)
    stats = SkillStats.from_batch(desc, probs, SKILLS, 0.2)

    # Execute
    spectrum = stats.to_prototypes(cov_floor=1e-4)

    # Assert
    for s in range(len(SKILLS)):
        member = probs[:, s] > 0.2
        x = desc.descriptor[member].double()
        a = desc.angular[member].double().mean(0)
        torch.testing.assert_close(spectrum.mean[s], x.mean(0))
        torch.testing.assert_close(
            spectrum.var[s], x.var(0, unbiased=False).clamp_min(1e-4)
        )
        torch.testing.assert_close(spectrum.angular[s], a / a.sum())
        assert spectrum.count[s] == member.sum()


def test_to_prototypes_constant_data_floors_variance_and_marks_absent() -> None:
    # Prepare: skill 0 seen twice with the same descriptor, skill 2 never
    desc = SpectralDescriptor(torch.ones(2, 6), torch.full((2, 4), 0.25))
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    stats = SkillStats.from_batch(desc, probs, SKILLS, 0.2)

    # Execute
    spectrum = stats.to_prototypes(cov_floor=1e-3)

    # Assert
    torch.testing.assert_close(spectrum.var[0], torch.full((6,), 1e-3).double())
    assert spectrum.present.tolist() == [True, True, False]
    torch.testing.assert_close(spectrum.mean[2], torch.zeros(6).double())
    torch.testing.assert_close(spectrum.var[2], torch.ones(6).double())


def test_blend_old_none_returns_new() -> None:
    # Prepare
    new = make_spectrum(1.0, 2.0, [1, 1, 1])

    # Execute
    out = blend(None, new, mode="ema", alpha=0.9)

    # Assert
    assert out is new


def test_blend_ema_mixes_shared_skills_and_keeps_one_sided_ones() -> None:
    # Prepare: color in both, count only old, shape only new
    old = make_spectrum(0.0, 1.0, [4, 3, 0])
    new = make_spectrum(10.0, 3.0, [2, 0, 5])

    # Execute
    out = blend(old, new, mode="ema", alpha=0.9)

    # Assert
    torch.testing.assert_close(out.mean[:, 0], torch.tensor([1.0, 0.0, 10.0]).double())
    torch.testing.assert_close(out.var[:, 0], torch.tensor([1.2, 1.0, 3.0]).double())
    torch.testing.assert_close(out.count, torch.tensor([6.0, 3.0, 5.0]).double())


def test_blend_count_equals_prototypes_of_summed_stats() -> None:
    # Prepare
    d1, d2 = make_desc(9), make_desc(20)
    s1 = SkillStats.from_batch(d1, make_probs(9), SKILLS, 0.2)
    s2 = SkillStats.from_batch(d2, make_probs(20), SKILLS, 0.2)

    # Execute
    out = blend(s1.to_prototypes(1e-6), s2.to_prototypes(1e-6), mode="count")
    expected = (s1 + s2).to_prototypes(1e-6)

    # Assert
    for name in ("mean", "var", "angular", "count"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))


def test_blend_replace_new_wins_where_present() -> None:
    # Prepare
    old = make_spectrum(0.0, 1.0, [4, 3, 0])
    new = make_spectrum(10.0, 3.0, [2, 0, 5])

    # Execute
    out = blend(old, new, mode="replace")

    # Assert
    torch.testing.assert_close(out.mean[:, 0], torch.tensor([10.0, 0.0, 10.0]).double())
    torch.testing.assert_close(out.count, torch.tensor([2.0, 3.0, 5.0]).double())


def test_blend_new_skill_names_are_appended() -> None:
    # Prepare
    old = make_spectrum(0.0, 1.0, [1, 1, 1])
    new = SkillSpectrum(
        ("shape", "size"),
        torch.full((2, 2), 5.0),
        torch.ones(2, 2),
        torch.full((2, 2), 0.5),
        torch.tensor([1.0, 2.0]),
    )

    # Execute
    out = blend(old, new, mode="replace")

    # Assert
    assert out.skills == (*SKILLS, "size")
    torch.testing.assert_close(
        out.mean[:, 0], torch.tensor([0.0, 0.0, 5.0, 5.0]).double()
    )


@pytest.mark.parametrize(
    ("mode", "alpha", "match"),
    [("mix", 0.9, "`mode` must be one of"), ("ema", 1.5, "`alpha` must be in")],
)
def test_blend_invalid_arguments_raise(mode, alpha, match) -> None:
    # Prepare
    spectrum = make_spectrum(0.0, 1.0, [1, 1, 1])

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        blend(spectrum, spectrum, mode=mode, alpha=alpha)


def test_skill_spectrum_save_load_round_trip(tmp_path) -> None:
    # Prepare
    stats = SkillStats.from_batch(make_desc(30), make_probs(30), SKILLS, 0.2)
    spectrum = stats.to_prototypes(1e-4)

    # Execute
    spectrum.save(tmp_path / "spectrum.safetensors")
    stats.save(tmp_path / "stats.safetensors")
    spectrum_back = SkillSpectrum.load(tmp_path / "spectrum.safetensors")
    stats_back = SkillStats.load(tmp_path / "stats.safetensors")

    # Assert
    assert spectrum_back.skills == SKILLS and stats_back.skills == SKILLS
    for name in ("mean", "var", "angular", "count"):
        torch.testing.assert_close(
            getattr(spectrum_back, name), getattr(spectrum, name)
        )
    for name in ("count", "sum", "sumsq", "angular_sum"):
        torch.testing.assert_close(getattr(stats_back, name), getattr(stats, name))


def test_skill_spectrum_load_stats_file_raises(tmp_path) -> None:
    # Prepare
    SkillStats.empty(SKILLS, 6, 4).save(tmp_path / "stats.safetensors")

    # Execute / Assert
    with pytest.raises(ValueError, match="not a fed-asr-skill-spectrum file"):
        SkillSpectrum.load(tmp_path / "stats.safetensors")


def test_arrays_round_trip_is_exact() -> None:
    # Prepare
    stats = SkillStats.from_batch(make_desc(10), make_probs(10), SKILLS, 0.2)

    # Execute
    back = SkillStats.from_arrays(stats.to_arrays(), SKILLS)
    arrays = back.to_prototypes(1e-4).to_arrays()

    # Assert
    torch.testing.assert_close(back.sumsq, stats.sumsq, atol=0, rtol=0)
    assert all(v.dtype == np.float64 for v in arrays.values())


def test_skill_stats_from_arrays_wrong_shape_names_key() -> None:
    # Prepare
    arrays = SkillStats.empty(SKILLS, 6, 4).to_arrays()
    arrays["sumsq"] = np.zeros((3, 5))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"array `sumsq` must have shape \(S=3, D=6\)"):
        SkillStats.from_arrays(arrays, SKILLS)


def test_skill_stats_from_arrays_nan_names_key() -> None:
    # Prepare
    arrays = SkillStats.empty(SKILLS, 6, 4).to_arrays()
    arrays["angular_sum"][1, 2] = np.nan

    # Execute / Assert
    with pytest.raises(ValueError, match="array `angular_sum` holds NaN"):
        SkillStats.from_arrays(arrays, SKILLS)


def test_skill_spectrum_from_arrays_missing_or_invalid_key_raises() -> None:
    # Prepare
    arrays = make_spectrum(0.0, 1.0, [1, 1, 1]).to_arrays()
    missing = {k: v for k, v in arrays.items() if k != "angular"}
    bad_var = dict(arrays, var=np.zeros((3, 2)))
    wrong_skills = dict(arrays)

    # Execute / Assert
    with pytest.raises(ValueError, match="missing array `angular`"):
        SkillSpectrum.from_arrays(missing, SKILLS)
    with pytest.raises(ValueError, match="array `var` must be positive"):
        SkillSpectrum.from_arrays(bad_var, SKILLS)
    with pytest.raises(ValueError, match=r"array `mean` must have shape \(S=2, D\)"):
        SkillSpectrum.from_arrays(wrong_skills, SKILLS[:2])


def test_skill_spectrum_to_moves_dtype_and_keeps_count() -> None:
    # Prepare
    spectrum = make_spectrum(1.0, 2.0, [1, 0, 3])

    # Execute
    moved = spectrum.to("cpu", torch.float32)

    # Assert
    assert moved.mean.dtype == torch.float32 and moved.var.dtype == torch.float32
    assert moved.present.tolist() == [True, False, True]
