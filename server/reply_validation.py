"""Validation of client replies before they reach an aggregate (issue: hostile peers).

Thin glue between the Flower messages and the pure checks of ``fed_asr.security``:
a train reply must carry exactly the adapter the server sent (same names, shapes,
dtypes), finite values, a plausible integer ``num-examples`` and an update within
``security.max_update_norm``. :class:`ReplyGuard` adds what depends on the run: the
data each client can hold (``server.example_caps``), the skill list, the range of the
spectral descriptor (``fed_asr.security.stat_bounds``) and the DP noise. A reply that
fails is dropped by the strategy (or the stage-end round) with the returned reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig, PrivacyConfig, SecurityConfig
from fed_asr.data import ContinualStream
from fed_asr.methods import ContinualMethod
from fed_asr.models.scoring import EVAL_PROTOCOLS, sample_skill
from fed_asr.security.adapter_dp import coarse_num_examples_up
from fed_asr.security.dp import max_skills_per_sample
from fed_asr.security.evaluation_checks import (
    AccuracyOutlier,
    accuracy_outliers,
    check_evaluation_counts,
)
from fed_asr.security.secagg import SecAggConfig
from fed_asr.security.stat_bounds import (
    DescriptorBounds,
    NoiseMargins,
    bounds_for_shape,
    check_stats_bounds,
    check_stats_skills,
    descriptor_bounds,
    dp_noise_margins,
)
from fed_asr.security.validation import (
    ReplyLimits,
    ValidationResult,
    check_num_examples,
    check_spectrum_stats,
    spec_from_arrays,
    validate_reply,
)
from fed_asr.wire import record_arrays
from server.example_caps import ExampleCaps

ReplyCheck = Callable[[Message, ArrayRecord | None], str | None]


def run_descriptor_bounds(
    cfg: ExperimentConfig, layer_heads: int | None
) -> DescriptorBounds | None:
    """The configured descriptor's range (DP clipping included).

    ``None`` for a per-head descriptor (``regularizer.heads=each``) while its J
    (``layer_heads``) is not known yet.
    """
    reg = cfg.regularizer
    if reg.heads == "each" and layer_heads is None:
        return None
    return descriptor_bounds(
        reg.n_radial,
        reg.n_angular,
        cfg.privacy.dp_clip if cfg.privacy.dp else None,
        features=reg.features,
        layer_heads=layer_heads if reg.heads == "each" else None,
    )


def _is_zero(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and float(value) == 0.0
    )


def make_train_reply_check(security: SecurityConfig) -> ReplyCheck:
    """A ``FedASR.reply_check`` validating train replies against the sent adapter.

    A reply with ``num-examples`` exactly 0 (a client without data for the stage) is
    accepted unchecked: the strategy never aggregates it.
    """
    limits = ReplyLimits.from_config(security)

    def check(msg: Message, sent: ArrayRecord | None) -> str | None:
        content = msg.content
        extra = sorted(set(content.array_records) - {P.ARRAYS_RECORD})
        if extra:
            return f"unexpected ArrayRecords {extra}"
        metrics = dict(content.metric_records[P.METRICS_RECORD])
        if _is_zero(metrics.get(P.NUM_EXAMPLES_KEY)):
            return None
        arrays = record_arrays(content.array_records[P.ARRAYS_RECORD])
        if sent is None:
            result = check_num_examples(metrics, limits.max_num_examples)
            return None if result else result.reason
        reference = record_arrays(sent)
        result = validate_reply(
            arrays, metrics, spec_from_arrays(reference), limits, reference
        )
        return None if result else result.reason

    return check


def _sent_skills(config: ConfigRecord | None) -> list[str] | None:
    value = None if config is None else config.get(P.SKILLS_KEY)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        return None
    return [str(s) for s in value]


class ReplyGuard:
    """The run's bounds on replies: data sizes, skills, descriptor range, DP noise.

    Parameters
    ----------
    security, privacy : SecurityConfig, PrivacyConfig
        Caps, clipping factors, outlier threshold; DP and secure aggregation.
    skills : Sequence[str]
        The run's skills, the rows of every statistics reply.
    caps : ExampleCaps | None
        What each client can claim; None: ``max_num_examples_per_site`` for all.
    bounds : DescriptorBounds | None
        The descriptor's range (DP clipping included); None: derived from the
        statistics' shapes.
    skills_per_sample : int | None
        Most skills one sample counts toward (DP sensitivity); None: all skills.
    eval_skills : Sequence[str] | None
        Skills that may name evaluation counts; None: ``skills``.
    per_head : bool
        The descriptor is per layer-head (``regularizer.heads=each``): with no
        ``bounds`` yet, statistics replies are refused instead of inferring a range.
    """

    def __init__(
        self,
        security: SecurityConfig,
        privacy: PrivacyConfig,
        skills: Sequence[str],
        *,
        caps: ExampleCaps | None = None,
        bounds: DescriptorBounds | None = None,
        skills_per_sample: int | None = None,
        eval_skills: Sequence[str] | None = None,
        per_head: bool = False,
    ) -> None:
        self.security = security
        self.privacy = privacy
        self.skills = tuple(skills)
        self.caps = caps or ExampleCaps(security)
        self.bounds = bounds
        self.skills_per_sample = skills_per_sample or max(len(self.skills), 1)
        self.eval_skills = frozenset(eval_skills or self.skills)
        # a per-head descriptor's range needs the model's J (``set_layer_heads``)
        self.per_head = per_head

    @classmethod
    def for_run(
        cls,
        cfg: ExperimentConfig,
        stream: ContinualStream,
        method: ContinualMethod,
        simulated: bool,
    ) -> ReplyGuard:
        """The guard of a run; ``simulated``: the server knows every partition."""
        reg = cfg.regularizer
        test_skills = {sample_skill(s) for stage in stream.stages for s in stage.test}
        return cls(
            cfg.security,
            cfg.privacy,
            stream.skills,
            caps=ExampleCaps.for_run(cfg, stream, method, simulated),
            bounds=run_descriptor_bounds(cfg, layer_heads=None),
            skills_per_sample=max_skills_per_sample(reg.tau_skill, len(stream.skills)),
            eval_skills=sorted(set(stream.skills) | test_skills),
            per_head=reg.heads == "each",
        )

    def set_layer_heads(self, cfg: ExperimentConfig, layer_heads: int) -> None:
        """Fix the descriptor range once the model's J is known (``heads=each``)."""
        self.bounds = run_descriptor_bounds(cfg, layer_heads)

    # -- train replies -------------------------------------------------------------
    def train_reason(self, msg: Message, stage: int, num_nodes: int) -> str | None:
        """Reason to drop a train reply whose ``num-examples`` exceeds its cap."""
        metrics = msg.content.metric_records[P.METRICS_RECORD]
        claimed = metrics[P.NUM_EXAMPLES_KEY]
        if _is_zero(claimed):
            return None
        result = check_num_examples(metrics, self.caps.per_site)
        if not result:
            return result.reason
        return self.count_reason("train", P.NUM_EXAMPLES_KEY, metrics, stage, num_nodes)

    def count_reason(
        self,
        kind: str,
        key: str,
        metrics: Mapping[str, object],
        stage: int,
        num_nodes: int,
    ) -> str | None:
        """Reason to drop a reply whose count ``metrics[key]`` exceeds its site's cap.

        ``kind`` names the data it counts (``train``, ``stage_end``; see
        ``ExampleCaps.cap``); ``stage_end`` caps are widened by the DP rounding.
        """
        cap = self.caps.cap(kind, metrics, stage, num_nodes)
        if isinstance(cap, str):
            return cap
        if kind == "stage_end":
            cap = self.coarse_cap(cap)
        claimed = metrics[key]
        if float(claimed) > cap:  # type: ignore[arg-type]
            return (
                f"Metric `{key}` = {claimed} exceeds what the client can hold: "
                f"{cap} ({self._cap_source()})."
            )
        return None

    def coarse_cap(self, cap: int) -> int:
        """A data-size cap widened to the rounding DP clients apply to their claims."""
        if not self.privacy.dp:
            return cap
        return coarse_num_examples_up(cap, self.privacy.num_examples_granularity)

    def _cap_source(self) -> str:
        if self.caps.knows_sites:
            return "its partition's training data"
        return "`security.max_num_examples_per_site`"

    # -- stage-end statistics ---------------------------------------------------------
    def _bounds(self, stats: Mapping[str, np.ndarray]) -> DescriptorBounds:
        if self.bounds is not None:
            return self.bounds
        if self.per_head:
            raise ValueError(
                "the per-head descriptor's range is not set (`set_layer_heads`)."
            )
        clip = self.privacy.dp_clip if self.privacy.dp else None
        dim, n_angular = np.shape(stats["sum"])[1], np.shape(stats["angular_sum"])[1]
        return bounds_for_shape(dim, n_angular, clip)

    def stats_reason(
        self,
        stats: dict[str, np.ndarray],
        metrics: Mapping[str, object],
        config: ConfigRecord | None,
        stage: int,
        num_nodes: int,
    ) -> str | None:
        """Reason to drop a clear-text statistics reply, or None.

        Checks, in order: the skill names sent with the rows; ``num-examples``
        (positive integer, at most the client's stage-end data); the structure of
        the arrays; every row against what its count of samples can produce
        (widened by the DP noise bound when ``privacy.dp``).
        """
        result = check_stats_skills(_sent_skills(config), self.skills)
        if not result:
            return result.reason
        claimed = metrics.get(P.NUM_EXAMPLES_KEY)
        result = check_num_examples(metrics, self.caps.per_site)
        if not result and not _is_zero(claimed):
            return result.reason
        reason = self.count_reason(
            "stage_end", P.NUM_EXAMPLES_KEY, metrics, stage, num_nodes
        )
        if reason is not None:
            return reason
        n = int(claimed)  # type: ignore[call-overload]
        margins = self._margins(contributors=1, shares=1)
        if margins.noisy:
            result = check_spectrum_stats(
                stats, n + margins.count, integer_counts=False, check_moments=False
            )
        else:
            result = check_spectrum_stats(stats, n)
        if result:
            result = self._check_bounds(stats, n, margins)
        return None if result else result.reason

    def _margins(self, contributors: int, shares: int) -> NoiseMargins:
        if not self.privacy.dp:
            return NoiseMargins()
        return dp_noise_margins(
            self.privacy,
            self.skills_per_sample,
            contributors=contributors,
            shares=shares,
            sigmas=self.security.stats_noise_sigmas,
        )

    def _check_bounds(
        self, stats: Mapping[str, np.ndarray], n: float, margins: NoiseMargins
    ) -> ValidationResult:
        try:
            bounds = self._bounds(stats)
        except ValueError as err:
            return ValidationResult(False, str(err))
        return check_stats_bounds(stats, n, bounds, margins, self.skills)

    def secure_sum_reason(
        self,
        summed: dict[str, np.ndarray],
        num_examples: int,
        contributors: int,
        num_nodes: int,
    ) -> str | None:
        """Reason to refuse a secure sum of ``contributors`` clients' statistics.

        The sum's rows must lie within what ``num_examples`` samples can produce,
        widened by the fixed-point rounding and, with DP, by the summed noise shares
        (each contributor adds ``1/t`` of the calibrated variance).
        """
        result = check_spectrum_stats(
            summed, float("inf"), integer_counts=False, check_moments=False
        )
        if not result:
            return result.reason
        shares = SecAggConfig.from_privacy_config(self.privacy, num_nodes).threshold
        margins = self._margins(contributors=max(contributors, 1), shares=shares)
        rounding = contributors / (2 * self.privacy.secagg_scale)
        margins = NoiseMargins(
            count=margins.count + rounding,
            sum=margins.sum + rounding,
            sumsq=margins.sumsq + rounding,
            angular_sum=margins.angular_sum + rounding,
        )
        result = self._check_bounds(summed, num_examples, margins)
        return None if result else result.reason

    # -- evaluation replies ----------------------------------------------------------
    def evaluation_reason(
        self, metrics: Mapping[str, object], seen_stages: int, num_nodes: int
    ) -> str | None:
        """Reason to drop an evaluation reply, or None (``check_evaluation_counts``)."""
        failure: list[str] = []

        def max_total(stage: int) -> int | None:
            cap = self.caps.cap("test", metrics, stage, num_nodes)
            if isinstance(cap, str):
                failure.append(cap)
                return 0
            return cap

        result = check_evaluation_counts(
            metrics, seen_stages, self.eval_skills, EVAL_PROTOCOLS, max_total
        )
        if failure:
            return failure[0]
        return None if result else result.reason

    def outliers(
        self, results: Mapping[str, Mapping[int, tuple[int, int]]]
    ) -> list[AccuracyOutlier]:
        """Clients whose accuracy is an outlier (none when the check is off)."""
        z_max = self.security.eval_outlier_z
        return [] if z_max is None else accuracy_outliers(results, z_max)
