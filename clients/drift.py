"""A client's drift diagnostics (``query.drift``): its share of the drift rows.

At the end of stage ``t`` the node records prototypes of its own share of stage
``t``'s training data, then measures every seen stage's test split against that
stage's prototypes (and its maps against those kept when that stage ended; both kept
in ``context.state``) and replies with poolable sums
(``fed_asr.drift``). The server pools the sums of all clients into the rows a
central run writes. Stages whose prototypes this node lost (a restarted node) are
left out of its reply.
"""

from __future__ import annotations

from flwr.app import Context, MetricRecord, RecordDict

from clients.records import numpy_record
from clients.site import Site
from fed_asr import protocol as P
from fed_asr.evaluation import AttentionProbe, DriftMonitor, probe_run_samples
from fed_asr.wire import record_arrays

_PROTOTYPES = "drift-prototypes"  # ArrayRecord in context.state: <stage>/<array>


def _probe(site: Site, samples: list, keep_maps: bool = False) -> AttentionProbe:
    return probe_run_samples(site.model, site.collator, samples, site.cfg, keep_maps)


def drift_reply(site: Site, context: Context, stage: int) -> RecordDict:
    """Record stage ``stage``'s prototypes, then the drift sums of every seen stage."""
    monitor = DriftMonitor(site.stream.skills, site.cfg.regularizer.cov_floor)
    if _PROTOTYPES in context.state.array_records:
        monitor.load_arrays(record_arrays(context.state.array_records[_PROTOTYPES]))
    train = site.stream.stages[stage].train
    if train:
        monitor.record(stage, _probe(site, train))
    metrics: dict[str, float | int] = {P.PARTITION_ID_KEY: site.partition_id}
    for i, seen in enumerate(site.stream.stages[: stage + 1]):
        if i not in monitor.prototypes or not seen.test:
            continue
        sums = monitor.sums(i, _probe(site, seen.test, keep_maps=True), after=stage)
        metrics.update(sums.to_metrics(i, site.stream.skills))
    # prototypes and this stage's reference maps (recorded by its floor row)
    context.state[_PROTOTYPES] = numpy_record(monitor.to_arrays())
    return RecordDict({P.METRICS_RECORD: MetricRecord(metrics)})
