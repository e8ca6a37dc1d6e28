"""Helpers of the tests that drive the ClientApp with real Flower messages.

Importable from any test module (``tests/`` is on ``sys.path`` via its conftest).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.site import Site, site_from_context
from fed_asr import protocol as P
from fed_asr.models import adapter_state


def set_task_identity(run_id: int = 1) -> None:
    """Flower stamps messages with the process's task identity; set a test one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1


def make_run_config(overrides: list[str]) -> dict[str, str]:
    """The ``run_config`` a ClientApp gets for these Hydra ``overrides``."""
    return {"config-name": "config", "overrides": shlex.join(overrides)}


def node_context(
    config: dict[str, str], partition: int, partitions: int = 2
) -> Context:
    """A fresh node context of ``partition`` out of ``partitions``."""
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={P.NODE_PARTITION_ID: partition, P.NODE_NUM_PARTITIONS: partitions},
        state=RecordDict(),
        run_config=config,
    )


def message(
    kind: str, records: Mapping[str, Any], config: dict[str, object]
) -> Message:
    """A ``kind`` message of ``records`` plus ``config`` as its ConfigRecord."""
    content = RecordDict({**records, P.CONFIG_RECORD: ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type=kind)


def first_site(overrides: list[str]) -> tuple[dict[str, str], Site, ArrayRecord]:
    """Run config of ``overrides``, its partition 0 of 2 and that site's adapter."""
    config = make_run_config(overrides)
    site = site_from_context(config, {P.NODE_PARTITION_ID: 0, P.NODE_NUM_PARTITIONS: 2})
    return config, site, ArrayRecord(torch_state_dict=adapter_state(site.model))


def loopback_grid(overrides: list[str], num_nodes: int = 2, run_id: int = 7) -> Any:
    """An in-process grid of ``num_nodes`` real ClientApps with these overrides."""
    from clients.app import make_client_app
    from clients.testing import LoopbackGrid, node_contexts

    config = make_run_config(overrides)
    app = make_client_app()
    contexts = node_contexts(config, num_nodes, run_id, first_node=100)
    return LoopbackGrid(dict.fromkeys(contexts, app), contexts)
