"""The malicious-server harness of the secure-aggregation attack tests.

Every attack runs the real ``SecureSpectrumRound`` over the in-process
``LoopbackGrid`` (protobuf on the wire, one ``Context`` per node). The server's lies
are hooks on the grid that rewrite one node's copy of a message or one reply; what
the attacker then holds is fed to the same reconstruction the honest server uses.
Each test fails on a main without site identities, the consistency check,
client-owned thresholds and the strict fixed-point bound: there the attack works.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flower_helpers import set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Message

from clients.app import make_client_app
from clients.secure import stage_statistics
from clients.site import site_from_context
from clients.testing import LoopbackGrid, node_contexts
from fed_asr import protocol as P
from fed_asr.config import ExperimentConfig, compose_config
from fed_asr.models import adapter_state, load_adapter_state
from server.secure_spectrum import SecureSpectrumRound

SESSION = "7/0/1"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def write_site_identities(folder: Path, count: int) -> list[dict[str, str]]:
    """Identity keys and the pinned list (docs/security.md format); node configs."""
    folder.mkdir(parents=True, exist_ok=True)
    sites = {}
    configs = []
    for i in range(count):
        key = Ed25519PrivateKey.from_private_bytes(bytes([i + 7]) * 32)
        path = folder / f"site-{i}.key"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        sites[f"site-{i}"] = (
            key.public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            .decode()
        )
        configs.append({"identity-key": str(path)})
    pinned = folder / "site-keys.json"
    pinned.write_text(json.dumps({"format": "fed-asr/site-keys/v1", "sites": sites}))
    return [{**c, "site-keys": str(pinned)} for c in configs]


class Federation:
    """``n`` ClientApps with site identities over a loopback grid (ids 1000...)."""

    def __init__(self, overrides: list[str], n: int, keys: Path) -> None:
        self.cfg: ExperimentConfig = compose_config("config", overrides)
        self.run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        self.n = n
        identities = write_site_identities(keys, n)
        self.nodes = {1000 + p: p for p in range(n)}
        contexts = node_contexts(self.run_config, n, 7, lambda p: identities[p])
        app = make_client_app()
        self.grid = LoopbackGrid({node: app for node in self.nodes}, contexts)
        site = self.site(0)
        self.arrays = ArrayRecord(torch_state_dict=adapter_state(site.model))

    def site(self, partition: int):  # type: ignore[no-untyped-def]
        return site_from_context(
            self.run_config,
            {P.NODE_PARTITION_ID: partition, P.NODE_NUM_PARTITIONS: self.n},
        )

    def stats(self, node: int) -> dict[str, np.ndarray]:
        """A node's true (clipped, un-noised) statistics of stage 0."""
        site = self.site(self.nodes[node])
        load_adapter_state(site.model, self.arrays.to_torch_state_dict())
        return stage_statistics(site, 0).to_arrays()

    def run(self, session: str = SESSION, **privacy: object):  # type: ignore[no-untyped-def]
        """The server's secure round of stage 0, ``privacy`` overriding the run's."""
        round_ = SecureSpectrumRound(
            self.grid,
            dataclasses.replace(self.cfg.privacy, **privacy),  # type: ignore[arg-type]
            session,
            60.0,
            skills=tuple(self.site(0).stream.skills),
        )
        return round_.run(self.arrays, 0, 10**6)


@pytest.fixture
def federation(run_overrides, tmp_path):  # type: ignore[no-untyped-def]
    def make(n: int = 3, **extra: object) -> Federation:
        overrides = run_overrides(
            "adv",
            **{"federation.num_clients": n, "privacy.secure_spectrum": "true", **extra},
        )
        return Federation(overrides, n, tmp_path / "keys")

    return make


def step_of(msg: Message) -> str:
    config = msg.content.config_records.get(P.CONFIG_RECORD, ConfigRecord())
    return str(config.get(P.SECAGG_STEP_KEY, ""))


def recorder(store: dict[tuple[str, int], Message]) -> Callable:
    """An ``on_reply`` hook that keeps every reply by (step, node)."""

    def hook(node: int, msg: Message, reply: Message) -> Message:
        store[(step_of(msg), node)] = reply
        return reply

    return hook
