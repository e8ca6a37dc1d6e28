"""Server side of the secure spectrum round (``privacy.secure_spectrum=true``).

Five ``query.secagg`` exchanges through the Flower ``Grid`` (advertise signed keys,
route encrypted shares, collect masked vectors, collect the survivors' signatures of
the survivor set, collect unmasking shares); the protocol itself is
``fed_asr.security.secagg``. The server ends up with the sum of the surviving
clients' statistics and nothing else. A client that fails or times out in any step,
or advertises an unusable key, is a dropout; the round succeeds while at least
``threshold`` clients stay (and, with site identities, a majority of the pinned
sites confirms the survivor set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.config import PrivacyConfig
from fed_asr.security.secagg import (
    AdvertiseKeys,
    ArrayLayout,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    UnmaskResponse,
)
from fed_asr.security.site_identity import load_site_keys
from fed_asr.wire import record_arrays, record_nbytes

# Adds records (the signature) to an outgoing content: (content, message type, node)
Decorate = Callable[[RecordDict, str, int], None]


@dataclass
class SecureRoundResult:
    """Outcome of one secure spectrum round.

    Attributes
    ----------
    arrays : dict[str, np.ndarray] | None
        Sum of the contributors' statistics, or None when the round failed.
    contributors : list[int]
        Node ids whose input is in the sum.
    num_examples : int
        Sum of the contributors' ``num-examples``.
    bytes_up, bytes_down : int
        Payload bytes received and sent over the four steps.
    dropped : list[dict[str, Any]]
        Nodes that failed a step: node id, step, reason.
    """

    arrays: dict[str, np.ndarray] | None = None
    contributors: list[int] = field(default_factory=list)
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)


def config_bytes(record: ConfigRecord | None) -> int:
    """Approximate payload bytes of a ConfigRecord (bytes and strings by length)."""
    if record is None:
        return 0
    total = 0
    for value in record.values():
        items = value if isinstance(value, list) else [value]
        for item in items:
            total += len(item) if isinstance(item, bytes | str) else 8
    return total


class SecureSpectrumRound:
    """Drives one secure aggregation of spectrum statistics over a ``Grid``.

    Parameters
    ----------
    grid : Grid
        Flower grid of the run.
    privacy : PrivacyConfig
        ``privacy.secagg_*`` settings.
    session : str
        Unique per run and stage (bound into every key and ciphertext).
    timeout : float
        Seconds to wait for each step's replies.
    decorate : Decorate | None
        Called on every final outgoing content with its message type and
        destination node (the signature).
    site_keys : str | None
        Pinned site list (``security.site_keys``): with it, advertisements and
        survivor-set signatures that no pinned site made are dropped here, before
        they could make the clients abort.
    """

    def __init__(
        self,
        grid: Grid,
        privacy: PrivacyConfig,
        session: str,
        timeout: float,
        decorate: Decorate | None = None,
        site_keys: str | None = None,
        skills: tuple[str, ...] = (),
    ) -> None:
        self.grid = grid
        # the rows of the summed statistics: every member checks its own order
        self.skills = tuple(skills)
        self.privacy = privacy
        self.session = session
        self.timeout = timeout
        self.decorate = decorate
        self.site_keys = site_keys
        self.result = SecureRoundResult()
        self.params: SecAggConfig | None = None

    # -- messaging -----------------------------------------------------------------
    def _exchange(
        self,
        step: str,
        payloads: dict[int, RecordDict],
    ) -> dict[int, Message]:
        """Send one step to each node; return the valid replies by node id."""
        assert self.params is not None
        message_type = f"{MessageType.QUERY}.{P.SECAGG_ACTION}"
        messages = []
        for node, content in payloads.items():
            content[P.CONFIG_RECORD] = ConfigRecord(
                {
                    **dict(content.config_records.get(P.CONFIG_RECORD, {})),
                    P.SECAGG_STEP_KEY: step,
                    P.SECAGG_SESSION_KEY: self.session,
                    P.SECAGG_THRESHOLD_KEY: self.params.threshold,
                    P.SECAGG_BITS_KEY: self.params.bits,
                    P.SECAGG_SCALE_KEY: float(self.params.scale),
                    P.SKILLS_KEY: list(self.skills),
                }
            )
            if self.decorate is not None:
                self.decorate(content, message_type, node)
            self.result.bytes_down += sum(
                record_nbytes(r) for r in content.array_records.values()
            ) + sum(config_bytes(r) for r in content.config_records.values())
            messages.append(
                Message(content=content, dst_node_id=node, message_type=message_type)
            )
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._drop(node, step, f"client error: {reply.error.reason}")
                continue
            self.result.bytes_up += sum(
                record_nbytes(r) for r in reply.content.array_records.values()
            ) + sum(config_bytes(r) for r in reply.content.config_records.values())
            replies[node] = reply
        for node in set(payloads) - set(replies):
            if not any(d["node"] == node for d in self.result.dropped):
                self._drop(node, step, "no reply (timeout)")
        return replies

    def _drop(self, node: int, step: str, reason: str) -> None:
        log(
            WARNING,
            "Secure spectrum round: node %d dropped at '%s': %s",
            node,
            step,
            reason,
        )
        self.result.dropped.append({"node": node, "step": step, "reason": reason})

    # -- protocol --------------------------------------------------------------------
    def run(
        self, arrays: ArrayRecord, stage: int, max_num_examples: int
    ) -> SecureRoundResult:
        """Run the five steps under the global adapter ``arrays``."""
        nodes = sorted(self.grid.get_node_ids())
        try:
            self.params = SecAggConfig.from_privacy_config(self.privacy, len(nodes))
            sites = load_site_keys(self.site_keys) if self.site_keys else None
            server = SecAggServer(self.params, self.session.encode(), sites)
            adverts, examples = self._advertise(nodes, arrays, stage, max_num_examples)
            book = server.collect_advertisements(adverts)
            self._refused(server, P.SECAGG_ADVERTISE)
            inboxes = server.route_shares(self._share(book))
            request = server.collect_masked_inputs(self._mask(inboxes))
            signatures = server.collect_confirmations(self._confirm(request))
            self._refused(server, P.SECAGG_CONFIRM)
            summed = server.unmask(self._unmask(request, signatures))
        except (SecAggError, ValueError) as err:
            log(WARNING, "Secure spectrum round, stage %d failed: %s", stage, err)
            self.result.dropped.append(
                {"node": -1, "step": "protocol", "reason": str(err)}
            )
            return self.result
        self.result.arrays = summed.arrays
        self.result.contributors = list(summed.contributors)
        self.result.num_examples = sum(examples[c] for c in summed.contributors)
        log(
            INFO,
            "Secure spectrum round, stage %d: sum of %d clients (threshold %d).",
            stage,
            len(summed.contributors),
            self.params.threshold,
        )
        return self.result

    def _refused(self, server: SecAggServer, step: str) -> None:
        """Record the clients the protocol server dropped (e.g. a low-order key)."""
        for node, reason in sorted(server.refused.items()):
            if not any(d["node"] == node for d in self.result.dropped):
                self._drop(node, step, f"refused: {reason}")

    def _advertise(
        self, nodes: Sequence[int], arrays: ArrayRecord, stage: int, max_examples: int
    ) -> tuple[dict[int, AdvertiseKeys], dict[int, int]]:
        payloads = {
            node: RecordDict(
                {
                    P.ARRAYS_RECORD: arrays,
                    P.CONFIG_RECORD: ConfigRecord({P.STAGE_KEY: stage}),
                }
            )
            for node in nodes
        }
        adverts, examples = {}, {}
        for node, reply in self._exchange(P.SECAGG_ADVERTISE, payloads).items():
            keys = reply.content.config_records.get(P.SECAGG_RECORD)
            metrics = reply.content.metric_records.get(P.METRICS_RECORD)
            try:
                mask_pk = bytes(keys["mask-pk"])  # type: ignore[index,arg-type]
                enc_pk = bytes(keys["enc-pk"])  # type: ignore[index,arg-type]
                site = str(keys["site"])  # type: ignore[index]
                signature = bytes(keys["signature"])  # type: ignore[index,arg-type]
                n = metrics[P.NUM_EXAMPLES_KEY]  # type: ignore[index]
            except (KeyError, TypeError):
                self._drop(node, P.SECAGG_ADVERTISE, "missing keys or num-examples")
                continue
            if (
                isinstance(n, bool)
                or float(n) != int(n)
                or not 0 <= int(n) <= max_examples
            ):
                self._drop(node, P.SECAGG_ADVERTISE, f"implausible num-examples {n}")
                continue
            adverts[node] = AdvertiseKeys(node, mask_pk, enc_pk, site, signature)
            examples[node] = int(n)
        return adverts, examples

    def _share(self, book: dict[int, AdvertiseKeys]) -> dict[int, dict[int, bytes]]:
        ids = sorted(book)
        payload = ConfigRecord(
            {
                "ids": [str(i) for i in ids],
                "mask-pks": [book[i].mask_public_key for i in ids],
                "enc-pks": [book[i].encryption_public_key for i in ids],
                "sites": [book[i].site for i in ids],
                "signatures": [book[i].signature for i in ids],
            }
        )
        payloads = {node: RecordDict({P.SECAGG_RECORD: payload}) for node in ids}
        shares = {}
        for node, reply in self._exchange(P.SECAGG_SHARE, payloads).items():
            record = reply.content.config_records.get(P.SECAGG_RECORD)
            try:
                recipients = [int(r) for r in record["recipients"]]  # type: ignore[index,union-attr]
                blobs = [bytes(b) for b in record["ciphertexts"]]  # type: ignore[index,union-attr]
                shares[node] = dict(zip(recipients, blobs, strict=True))
            except (KeyError, TypeError, ValueError):
                self._drop(node, P.SECAGG_SHARE, "malformed share reply")
        return shares

    def _mask(self, inboxes: dict[int, dict[int, bytes]]) -> dict[int, MaskedInput]:
        payloads = {}
        for node, inbox in inboxes.items():
            senders = sorted(inbox)
            payloads[node] = RecordDict(
                {
                    P.SECAGG_RECORD: ConfigRecord(
                        {
                            "senders": [str(s) for s in senders],
                            "ciphertexts": [inbox[s] for s in senders],
                        }
                    )
                }
            )
        masked = {}
        for node, reply in self._exchange(P.SECAGG_MASK, payloads).items():
            try:
                vector = record_arrays(
                    reply.content.array_records[P.SECAGG_MASKED_RECORD]
                )["vector"]
                text = str(reply.content.config_records[P.SECAGG_RECORD]["layout"])
                layout = ArrayLayout.from_json(text) if text != "[]" else None
            except (KeyError, ValueError, TypeError):
                self._drop(node, P.SECAGG_MASK, "malformed masked input")
                continue
            masked[node] = MaskedInput(node, vector, layout)
        return masked

    def _confirm(self, request: UnmaskRequest) -> dict[int, bytes]:
        payload = ConfigRecord(
            {
                "survivors": [str(s) for s in request.survivors],
                "dropped": [str(d) for d in request.dropped],
            }
        )
        payloads = {
            n: RecordDict({P.SECAGG_RECORD: payload}) for n in request.survivors
        }
        signatures = {}
        for node, reply in self._exchange(P.SECAGG_CONFIRM, payloads).items():
            record = reply.content.config_records.get(P.SECAGG_RECORD)
            try:
                signatures[node] = bytes(record["signature"])  # type: ignore[index,arg-type]
            except (KeyError, TypeError):
                self._drop(node, P.SECAGG_CONFIRM, "malformed confirmation")
        return signatures

    def _unmask(
        self, request: UnmaskRequest, signatures: dict[int, bytes]
    ) -> dict[int, UnmaskResponse]:
        signers = sorted(signatures)
        payload = ConfigRecord(
            {
                "survivors": [str(s) for s in request.survivors],
                "dropped": [str(d) for d in request.dropped],
                "signers": [str(s) for s in signers],
                "signatures": [signatures[s] for s in signers],
            }
        )
        payloads = {node: RecordDict({P.SECAGG_RECORD: payload}) for node in signers}
        responses = {}
        for node, reply in self._exchange(P.SECAGG_UNMASK, payloads).items():
            record = reply.content.config_records.get(P.SECAGG_RECORD)
            try:
                seed = dict(
                    zip(
                        (int(k) for k in record["seed-owners"]),  # type: ignore[index,union-attr]
                        (bytes(v) for v in record["seed-shares"]),  # type: ignore[index,union-attr]
                        strict=True,
                    )
                )
                keys = dict(
                    zip(
                        (int(k) for k in record["key-owners"]),  # type: ignore[index,union-attr]
                        (bytes(v) for v in record["key-shares"]),  # type: ignore[index,union-attr]
                        strict=True,
                    )
                )
            except (KeyError, TypeError, ValueError):
                self._drop(node, P.SECAGG_UNMASK, "malformed unmask reply")
                continue
            responses[node] = UnmaskResponse(node, seed, keys)
        return responses
