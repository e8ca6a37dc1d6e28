"""Tests of fed_asr.spectrum_strategies: spectrum merge strategies, registry."""

from __future__ import annotations

import pytest
import torch

from fed_asr import spectrum_strategies
from fed_asr.config import SpectrumConfig
from fed_asr.spectrum import SkillStats
from fed_asr.spectrum_strategies import (
    SPECTRUM_STRATEGIES,
    Pooled,
    SpectrumStrategy,
    get_spectrum_strategy,
    register_spectrum_strategy,
)

SKILLS = ("color", "shape")
FLOOR = 1e-4


def make_stats(
    counts: list[float], means: list[list[float]], vars_: list[list[float]]
) -> SkillStats:
    """Client statistics whose prototypes are exactly ``means``/``vars_`` (M = 2).

    The angular distribution of skill s is (1 - m, m), m = first mean / 10 in [0, 1].
    """
    n = torch.tensor(counts, dtype=torch.float64)[:, None]  # (S, 1)
    mu = torch.tensor(means, dtype=torch.float64)  # (S, D)
    var = torch.tensor(vars_, dtype=torch.float64)  # (S, D)
    first = (mu[:, :1] / 10).clamp(0.0, 1.0)
    angular = torch.cat([1 - first, first], dim=1)  # (S, 2)
    return SkillStats(SKILLS, n[:, 0], n * mu, n * (var + mu.square()), n * angular)


@pytest.fixture
def clients() -> list[SkillStats]:
    """Three clients; client 2 lacks the ``shape`` skill."""
    return [
        make_stats([2, 1], [[1.0, 2.0], [4.0, 0.0]], [[1.0, 4.0], [1.0, 1.0]]),
        make_stats([6, 3], [[3.0, 2.0], [2.0, 2.0]], [[4.0, 1.0], [9.0, 1.0]]),
        make_stats([2, 0], [[5.0, 8.0], [0.0, 0.0]], [[9.0, 1.0], [1.0, 1.0]]),
    ]


def d64(values: list[float]) -> torch.Tensor:
    """float64 tensor."""
    return torch.tensor(values, dtype=torch.float64)


def test_pooled_merge_equals_pooled_moments(clients) -> None:
    # Prepare: color n = 10, E[x0] = (2*1 + 6*3 + 2*5) / 10 = 3,
    # E[x0^2] = (2*2 + 6*13 + 2*34) / 10 = 15 -> var 6
    cfg = SpectrumConfig(strategy="pooled")

    # Execute
    out = get_spectrum_strategy("pooled").merge(clients, cfg, FLOOR)

    # Assert
    torch.testing.assert_close(out.mean[0], d64([3.0, 3.2]))
    torch.testing.assert_close(out.var[0, 0], d64([6.0])[0])
    torch.testing.assert_close(out.mean[1], d64([2.5, 1.5]))
    torch.testing.assert_close(out.count, d64([10.0, 4.0]))
    torch.testing.assert_close(out.angular[0], d64([0.7, 0.3]))


def test_pooled_merge_of_one_summed_entry_equals_merge_of_clients(clients) -> None:
    # Prepare: what the server sees after secure aggregation
    summed = clients[0] + clients[1] + clients[2]

    # Execute
    direct = Pooled().merge(clients, SpectrumConfig(), FLOOR)
    secure = Pooled().merge([summed], SpectrumConfig(), FLOOR)

    # Assert
    torch.testing.assert_close(secure.mean, direct.mean)
    torch.testing.assert_close(secure.var, direct.var)


@pytest.mark.parametrize(
    ("cfg", "mean", "var"),
    [
        # mean, weighted: color weights (0.2, 0.6, 0.2); shape (0.25, 0.75), client 2
        # ignored
        pytest.param(
            SpectrumConfig(strategy="mean", weighted=True),
            ([3.0, 3.2], [2.5, 1.5]),
            ([4.4, 1.6], [7.0, 1.0]),
            id="mean-weights-clients-by-count",
        ),
        # median: color over 3 clients; shape over 2 -> mean of the two middle values
        pytest.param(
            SpectrumConfig(strategy="median"),
            ([3.0, 2.0], [3.0, 1.0]),
            ([4.0, 1.0], [5.0, 1.0]),
            id="median-is-coordinatewise",
        ),
    ],
)
def test_merge_per_skill_mean_var_and_count(
    clients: list[SkillStats],
    cfg: SpectrumConfig,
    mean: tuple[list[float], list[float]],
    var: tuple[list[float], list[float]],
) -> None:
    # Execute
    out = get_spectrum_strategy(cfg.strategy).merge(clients, cfg, FLOOR)

    # Assert
    torch.testing.assert_close(out.mean[0], d64(mean[0]))
    torch.testing.assert_close(out.var[0], d64(var[0]))
    torch.testing.assert_close(out.mean[1], d64(mean[1]))
    torch.testing.assert_close(out.var[1], d64(var[1]))
    torch.testing.assert_close(out.count, d64([10.0, 4.0]))


def test_mean_unweighted_merge_averages_clients_holding_the_skill(clients) -> None:
    # Prepare
    cfg = SpectrumConfig(strategy="mean", weighted=False)

    # Execute
    out = get_spectrum_strategy("mean").merge(clients, cfg, FLOOR)

    # Assert
    torch.testing.assert_close(out.mean[0], d64([3.0, 4.0]))
    torch.testing.assert_close(out.var[0], d64([14 / 3, 2.0]))
    torch.testing.assert_close(out.mean[1], d64([3.0, 1.0]))  # client 2 ignored
    torch.testing.assert_close(out.angular[1], d64([0.7, 0.3]))


def test_barycenter_merge_matches_w2_closed_form(clients) -> None:
    # Prepare: sigma = sum w_k sigma_k; color w = (0.2, 0.6, 0.2)
    cfg = SpectrumConfig(strategy="barycenter", weighted=True)
    sigma_color = d64([0.2 * 1 + 0.6 * 2 + 0.2 * 3, 0.2 * 2 + 0.6 * 1 + 0.2 * 1])
    sigma_shape = d64([0.25 * 1 + 0.75 * 3, 1.0])

    # Execute
    out = get_spectrum_strategy("barycenter").merge(clients, cfg, FLOOR)

    # Assert
    torch.testing.assert_close(out.mean[0], d64([3.0, 3.2]))
    torch.testing.assert_close(out.var[0], sigma_color.square())
    torch.testing.assert_close(out.var[1], sigma_shape.square())
    torch.testing.assert_close(out.mean[1], d64([2.5, 1.5]))


def test_trimmed_merge_drops_extremes_of_each_coordinate() -> None:
    # Prepare: 5 clients, trim 0.2 -> drop 1 smallest and 1 largest per coordinate
    values = [1.0, 7.0, 3.0, -50.0, 4.0]
    stats = [
        make_stats([1, 1], [[v, -v], [v, v]], [[1.0, 1.0], [1.0, 1.0]]) for v in values
    ]
    cfg = SpectrumConfig(strategy="trimmed", trim_fraction=0.2)

    # Execute
    out = get_spectrum_strategy("trimmed").merge(stats, cfg, FLOOR)

    # Assert: kept {1, 3, 4} for x0 and {-1, -3, -4} for x1
    torch.testing.assert_close(out.mean[0], d64([8 / 3, -8 / 3]))
    torch.testing.assert_close(out.var[0], d64([1.0, 1.0]))


@pytest.mark.parametrize(
    ("name", "bounded"), [("median", True), ("trimmed", True), ("mean", False)]
)
def test_strategy_one_poisoned_client_of_five(name, bounded) -> None:
    # Prepare: 4 honest clients around 0, one sends prototypes 1e6 away
    honest_means = torch.randn(4, 2, 3, dtype=torch.float64)  # (K, S, D)
    stats = [
        make_stats([10, 10], honest_means[k].tolist(), [[1.0] * 3] * 2)
        for k in range(4)
    ]
    stats.append(make_stats([10, 10], [[1e6] * 3] * 2, [[1.0] * 3] * 2))
    cfg = SpectrumConfig(strategy=name, trim_fraction=0.2)
    spread = honest_means.max(0).values - honest_means.min(0).values  # (S, D)

    # Execute
    out = get_spectrum_strategy(name).merge(stats, cfg, FLOOR)

    # Assert
    shift = (out.mean - honest_means.mean(0)).abs()
    assert bool((shift < spread).all()) is bounded


def test_merge_skill_held_by_no_client_has_zero_count() -> None:
    # Prepare
    stats = [make_stats([3, 0], [[1.0], [0.0]], [[1.0], [1.0]])] * 2

    # Execute
    results = {
        name: get_spectrum_strategy(name).merge(stats, SpectrumConfig(), FLOOR)
        for name in SPECTRUM_STRATEGIES
    }

    # Assert
    for out in results.values():
        assert out.present.tolist() == [True, False]
        assert torch.isfinite(out.mean).all() and (out.var > 0).all()


def test_merge_floors_variance_of_constant_clients() -> None:
    # Prepare: every client saw a constant descriptor
    stats = [make_stats([2, 2], [[1.0], [2.0]], [[0.0], [0.0]])] * 3

    # Execute
    results = [
        get_spectrum_strategy(name).merge(stats, SpectrumConfig(), FLOOR)
        for name in SPECTRUM_STRATEGIES
    ]

    # Assert
    for out in results:
        torch.testing.assert_close(out.var, torch.full((2, 1), FLOOR).double())


def test_merge_no_clients_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`client_stats` must hold at least one"):
        get_spectrum_strategy("mean").merge([], SpectrumConfig(), FLOOR)


def test_merge_clients_with_different_skills_raises(clients) -> None:
    # Prepare
    other = SkillStats.empty(("color", "size"), 2, 2)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"`client_stats\[1\]` has skills"):
        get_spectrum_strategy("median").merge(
            [clients[0], other], SpectrumConfig(), FLOOR
        )


def test_secure_compatible_only_pooled() -> None:
    # Execute
    flags = {name: cls.secure_compatible for name, cls in SPECTRUM_STRATEGIES.items()}

    # Assert
    assert flags == {
        "pooled": True,
        "mean": False,
        "barycenter": False,
        "median": False,
        "trimmed": False,
    }


def test_register_spectrum_strategy_duplicate_raises() -> None:
    # Execute / Assert
    with pytest.raises(KeyError, match="'pooled' is already registered"):
        register_spectrum_strategy("pooled", Pooled)


def test_get_spectrum_strategy_unknown_lists_choices() -> None:
    # Execute / Assert
    with pytest.raises(KeyError) as info:
        get_spectrum_strategy("pooles")
    assert info.value.args[0] == (
        "Unknown spectrum strategy 'pooles'. Available: "
        "['barycenter', 'mean', 'median', 'pooled', 'trimmed']."
    )


def test_register_spectrum_strategy_new_name_is_found(monkeypatch) -> None:
    # Prepare
    monkeypatch.setattr(spectrum_strategies, "SPECTRUM_STRATEGIES", {})

    class First(Pooled):
        """Test strategy."""

    # Execute
    register_spectrum_strategy("first", First)

    # Assert
    assert isinstance(get_spectrum_strategy("first"), First)
    assert "first" not in SPECTRUM_STRATEGIES


@pytest.mark.parametrize(
    ("name", "cls", "match"),
    [("Pooled2", Pooled, "snake_case"), ("other", object, "subclass SpectrumStrategy")],
)
def test_register_spectrum_strategy_invalid_raises(name, cls, match) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        register_spectrum_strategy(name, cls)


def test_spectrum_strategy_base_is_abstract() -> None:
    # Execute / Assert
    with pytest.raises(TypeError):
        SpectrumStrategy()  # type: ignore[abstract]
