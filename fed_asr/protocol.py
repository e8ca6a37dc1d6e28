"""Record names and message keys shared by the ServerApp and the ClientApp.

Each key is defined once here (kebab-case, as Flower's own ``"server-round"``). See
``docs/protocol.md`` for what travels in which message.
"""

from __future__ import annotations

# Message actions (message_type = "<category>.<action>")
SPECTRUM_ACTION = "spectrum"  # query.spectrum: stage-end per-skill statistics
SECAGG_ACTION = "secagg"  # query.secagg: one step of the secure spectrum round
DRIFT_ACTION = "drift"  # query.drift: a client's drift sums at a stage end

# Records inside a message's RecordDict
ARRAYS_RECORD = "arrays"  # ArrayRecord: LoRA adapter state (peft keys)
CONFIG_RECORD = "config"  # ConfigRecord: per-round settings (keys below)
METRICS_RECORD = "metrics"  # MetricRecord: reply metrics
SPECTRUM_RECORD = "spectrum"  # ArrayRecord: global skill spectrum (server -> client)
STATS_RECORD = (
    "stats"  # ArrayRecord: per-skill sufficient statistics (client -> server)
)
SIGNATURE_RECORD = "signature"  # ConfigRecord: Ed25519 signature of the whole message
SECAGG_RECORD = "secagg"  # ConfigRecord: keys, shares, survivor lists (both ways)
SECAGG_MASKED_RECORD = "secagg-masked"  # ArrayRecord: a client's masked uint64 vector

# ConfigRecord keys (server -> client)
SERVER_ROUND_KEY = "server-round"
GLOBAL_ROUND_KEY = "global-round"
STAGE_KEY = "stage"
NUM_SEEN_STAGES_KEY = "num-seen-stages"
SPECTRUM_VERSION_KEY = "spectrum-version"  # digest of the current global spectrum
SECAGG_STEP_KEY = "secagg-step"  # advertise | share | mask | confirm | unmask
SECAGG_SESSION_KEY = "secagg-session"  # "<run-id>/<stage>": binds keys to one round
SECAGG_THRESHOLD_KEY = "secagg-threshold"
SECAGG_BITS_KEY = "secagg-bits"
SECAGG_SCALE_KEY = "secagg-scale"
SIGNATURE_ROUND_KEY = (
    "signed-round"  # in SIGNATURE_RECORD: round bound in the signature
)
SIGNATURE_SEQUENCE_KEY = "signed-sequence"  # in SIGNATURE_RECORD: message's sequence
SIGNATURE_VALUE_KEY = "ed25519"  # in SIGNATURE_RECORD: signature of the whole message

# Steps of the secure spectrum round, in order
SECAGG_ADVERTISE = "advertise"
SECAGG_SHARE = "share"
SECAGG_MASK = "mask"
SECAGG_CONFIRM = "confirm"  # consistency check: survivors sign the survivor set
SECAGG_UNMASK = "unmask"

# MetricRecord keys (client -> server)
NUM_EXAMPLES_KEY = "num-examples"
PARTITION_ID_KEY = "partition-id"
SKILLS_KEY = "skills"  # CONFIG_RECORD of a stats reply: the skill of each row
TRAIN_SECONDS_KEY = "train-seconds"
LOSS_PREFIX = "loss-"  # loss-task, loss-spec, loss-geo, loss-total
CORRECT_PREFIX = "correct-"  # correct-<stage>
TOTAL_PREFIX = "total-"  # total-<stage>

# Node config keys (set per SuperNode; Flower's simulation sets the first two)
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_ROOT = "data-root"
NODE_VERIFY_KEY = "verify-key"  # path of the server's signing.pub on this node
NODE_IDENTITY_KEY = "identity-key"  # path of this site's Ed25519 identity key
NODE_SITE_KEYS = "site-keys"  # path of the pinned site list (site-keys.json)
# Socket of this site's long-lived worker (clients/entry.py, clients/site_worker.py)
NODE_SITE_WORKER = "site-worker"


def correct_key(stage: int, protocol: str = "all", skill: str | None = None) -> str:
    """Metric key of the correct answers on ``stage`` (under ``protocol``, of a skill).

    ``correct-<stage>`` (protocol ``all``), ``correct-type-<stage>``, and per skill
    ``correct-<protocol>-<stage>-<skill>``.
    """
    if skill is not None:
        return f"{CORRECT_PREFIX}{protocol}-{stage}-{skill}"
    if protocol == "all":
        return f"{CORRECT_PREFIX}{stage}"
    return f"{CORRECT_PREFIX}{protocol}-{stage}"


def total_key(stage: int, skill: str | None = None) -> str:
    """Metric key of the scored questions on ``stage`` (of a skill)."""
    if skill is not None:
        return f"{TOTAL_PREFIX}{stage}-{skill}"
    return f"{TOTAL_PREFIX}{stage}"


def loss_key(term: str) -> str:
    """Metric key of a loss term (``task``, ``spec``, ``geo``, ``total``)."""
    return f"{LOSS_PREFIX}{term}"


# A method's own stage-end statistics (client -> server) and memory (server -> client)
STATISTICS_PREFIX = "stats-"  # ArrayRecord stats-<name>: additive sums
STATISTICS_COUNT_PREFIX = "count-"  # MetricRecord key count-<name>: samples summed
MEMORY_PREFIX = "memory-"  # ArrayRecord memory-<name>: merged state of earlier stages


def statistics_record(name: str) -> str:
    """Record of a method's stage-end statistics ``name`` in a reply."""
    return f"{STATISTICS_PREFIX}{name}"


def statistics_count_key(name: str) -> str:
    """Metric key of how many samples statistics ``name`` sum."""
    return f"{STATISTICS_COUNT_PREFIX}{name}"


def memory_record(name: str) -> str:
    """Record of a method's memory ``name`` in a train message."""
    return f"{MEMORY_PREFIX}{name}"
