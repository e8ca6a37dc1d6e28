"""The federated continual run of the ServerApp: stages, rounds, spectrum, resume."""

from __future__ import annotations

import dataclasses
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.baselines import (
    FISHER_COUNT_KEY,
    FISHER_RECORD,
    PREVIOUS_ADAPTER_RECORD,
    mean_fisher,
    update_memory,
)
from fed_asr.config import ExperimentConfig, SecurityConfig
from fed_asr.data import build_stream
from fed_asr.lora_aggregation import get_lora_aggregation
from fed_asr.methods import METHODS, StageMemory
from fed_asr.metrics import AccuracyMatrix
from fed_asr.models import load_base_model, resolve_device
from fed_asr.outputs import seed_everything, write_run_outputs
from fed_asr.progress import format_seconds
from fed_asr.security.dp import (
    PrivacyAccountant,
    calibrate_stats_noise,
    max_skills_per_sample,
)
from fed_asr.security.signing import load_private_key
from server.checkpoint import Checkpoint, Checkpointer
from server.records import record_bytes, record_to_numpy
from server.reply_validation import make_train_reply_check
from server.strategy import FedASR, RoundLog

# Checkpointed with the adapter under these key prefixes (StageMemory of the method)
_MEMORY_PREFIXES = {"previous": "memory/previous/", "fisher": "memory/fisher/"}


def server_signing_key(security: SecurityConfig) -> Ed25519PrivateKey | None:
    """The server's signing key when ``security.sign`` is on.

    The PEM may be encrypted; its password is read from the environment variable
    ``FED_ASR_SIGNING_KEY_PASSWORD``.

    Raises
    ------
    ValueError
        ``security.sign=true`` without ``security.signing_key``.
    """
    if not security.sign:
        return None
    if not security.signing_key:
        raise ValueError(
            "`security.sign=true` needs `security.signing_key` (the PEM written by "
            "`fed-asr-credentials`, e.g. certificates/signing.key)."
        )
    password = os.environ.get("FED_ASR_SIGNING_KEY_PASSWORD")
    return load_private_key(
        Path(security.signing_key).expanduser(),
        password.encode() if password else None,
    )


def privacy_report(
    cfg: ExperimentConfig, releases: list[int], num_skills: int
) -> dict[str, Any]:
    """DP summary for ``metrics.json``: epsilon spent over the stage-end releases.

    ``epsilon_spent`` composes every release as if on the same data (the
    conservative figure); each stage's data being disjoint, a sample is in one
    release and ``epsilon_per_release`` bounds it alone.
    """
    if not cfg.privacy.dp:
        return {"dp": False}
    m = max_skills_per_sample(cfg.regularizer.tau_skill, num_skills)
    noise = calibrate_stats_noise(cfg.privacy, m)
    accountant = PrivacyAccountant(cfg.privacy.dp_delta)
    for stage in releases:
        accountant.record(noise.noise_multiplier, f"stage {stage}")
    return {
        "dp": True,
        "mode": "distributed (secure aggregation)"
        if cfg.privacy.secure_spectrum
        else "local (each client's release)",
        "releases": len(releases),
        "epsilon_per_release": cfg.privacy.dp_epsilon,
        "delta": cfg.privacy.dp_delta,
        "epsilon_spent": accountant.epsilon() if releases else 0.0,
        "noise_multiplier": noise.noise_multiplier,
        "clip": cfg.privacy.dp_clip,
        "skills_per_sample": m,
    }


class FederatedRun:
    """Runs every stage of a FedASR experiment over a Flower ``Grid``.

    Parameters
    ----------
    cfg : ExperimentConfig
        The experiment.
    grid : Grid
        Flower grid (simulation or deployment).
    engine : str
        Recorded in ``metrics.json`` (``simulation`` or ``deployment``).
    """

    def __init__(self, cfg: ExperimentConfig, grid: Grid, engine: str = "simulation"):
        self.cfg = cfg
        self.grid = grid
        self.engine = engine
        self.out = Path(cfg.output_dir).expanduser().resolve()
        self.signing_key = server_signing_key(cfg.security)
        self.checkpointer = Checkpointer(
            self.out / "checkpoint",
            keep=cfg.federation.keep_checkpoints,
            hash_files=cfg.security.hash_checkpoints,
            signing_key=self.signing_key,
        )
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.rounds_at_start = 0
        self.spectrum_stage = -1
        self.memory = StageMemory()

    def run(self) -> Path:
        """Run (or resume) the experiment and return the ``metrics.json`` path."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        stream = build_stream(cfg.data, cfg.seed)
        self.stage_names = [s.name for s in stream.stages]
        method_cls = METHODS[cfg.method.name] if cfg.method.name in METHODS else None
        if method_cls is None:
            raise KeyError(
                f"Unknown method {cfg.method.name!r}. Available: {sorted(METHODS)}."
            )
        shares_spectrum = method_cls.shares_spectrum
        self.method_cls = method_cls
        self.lora_aggregation = get_lora_aggregation(cfg.lora.aggregation)
        base, _ = load_base_model(cfg.model, stream.vocabulary(), resolve_device("cpu"))
        self.model = self.lora_aggregation.attach(base, cfg.lora, cfg.seed)
        arrays = ArrayRecord(
            torch_state_dict=self.lora_aggregation.exchanged_state(self.model)
        )
        fed = cfg.federation
        self.strategy = FedASR(
            skills=stream.skills,
            spectrum_cfg=cfg.spectrum,
            cov_floor=cfg.regularizer.cov_floor,
            send_spectrum=method_cls.uses_spectrum and shares_spectrum,
            seed=cfg.seed,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=min(fed.min_available_clients, fed.num_clients),
            min_evaluate_nodes=min(fed.min_available_clients, fed.num_clients),
            min_available_nodes=min(fed.min_available_clients, fed.num_clients),
            arrays_aggregator=(
                self.lora_aggregation.aggregate
                if self.lora_aggregation.server_merges
                else None
            ),
            reply_check=make_train_reply_check(cfg.security),
            privacy=cfg.privacy,
            security=cfg.security,
            signing_key=self.signing_key,
        )
        self.strategy.on_round_end = self._round_end
        nodes = len(list(self.grid.get_node_ids()))
        if nodes != fed.num_clients:
            log(
                WARNING,
                "The federation has %d SuperNodes but `federation.num_clients` "
                "is %d: the data is split into %d shares (one per SuperNode).",
                nodes,
                fed.num_clients,
                nodes,
            )
        done_rounds = 0
        if cfg.resume:
            done_rounds, arrays = self._restore(arrays)
        R, T = fed.rounds_per_stage, len(stream.stages)
        self.total_rounds = R * T
        self.rounds_at_start = done_rounds
        timeout = fed.round_timeout_s or 3600.0
        for t in range(T):
            done_in_stage = min(max(done_rounds - t * R, 0), R)
            self.strategy.stage = t
            self.strategy.extra_train_records = self._memory_records()
            if done_in_stage < R:
                self.strategy.round_offset = t * R + done_in_stage
                result = self.strategy.start(
                    grid=self.grid,
                    initial_arrays=arrays,
                    num_rounds=R - done_in_stage,
                    timeout=timeout,
                    train_config=self._train_config(t),
                    evaluate_config=ConfigRecord(),
                )
                arrays = self.strategy.current_arrays or result.arrays or arrays
            keeps_memory = t < T - 1 and (
                method_cls.needs_previous_adapter or method_cls.needs_fisher
            )
            query = method_cls.stage_end_round(t, T)
            if (query or keeps_memory) and self.spectrum_stage < t:
                if query:
                    self.strategy.spectrum_round(
                        self.grid, arrays, t, timeout, merge=shares_spectrum
                    )
                if keeps_memory:
                    self._update_memory(arrays)
                self.spectrum_stage = t
                self._save(arrays, (t + 1) * R)
        self.lora_aggregation.load(self.model, arrays.to_torch_state_dict())
        return self._write_outputs(T, R)

    # -- configuration -------------------------------------------------------------
    def _train_config(self, stage: int) -> ConfigRecord:
        cfg = self.cfg
        return ConfigRecord(
            {
                P.STAGE_KEY: stage,
                P.BETA_KEY: float(cfg.regularizer.beta),
                P.GAMMA_KEY: float(cfg.regularizer.gamma),
                P.LOCAL_EPOCHS_KEY: int(cfg.federation.local_epochs),
                P.LR_KEY: float(cfg.train.lr),
                P.SEED_KEY: int(cfg.seed),
            }
        )

    # -- method memory (LwF teacher, EWC anchor and Fisher) --------------------------
    def _update_memory(self, arrays: ArrayRecord) -> None:
        """Keep the stage-end global adapter and the pooled Fisher of the replies."""
        fisher = None
        if self.method_cls.needs_fisher:
            parts = []
            up = 0
            for msg in self.strategy.stage_end_replies:
                record = msg.content.array_records.get(FISHER_RECORD)
                metrics = msg.content.metric_records.get(P.METRICS_RECORD)
                if record is None or metrics is None or FISHER_COUNT_KEY not in metrics:
                    log(
                        WARNING,
                        "Stage-end round: reply from node %d has no Fisher; skipped.",
                        msg.metadata.src_node_id,
                    )
                    continue
                arrays_np = record_to_numpy(record)
                sums = {k: torch.from_numpy(v) for k, v in arrays_np.items()}
                parts.append((sums, int(metrics[FISHER_COUNT_KEY])))
                up += record_bytes(record)
            if self.strategy.rounds:
                self.strategy.rounds[-1].bytes_up_extra += up
            fisher = mean_fisher(parts)
        self.memory = update_memory(
            self.method_cls,
            self.memory,
            arrays.to_torch_state_dict(),
            fisher,
            self.cfg.method.ewc_decay,
        )

    def _memory_records(self) -> dict[str, ArrayRecord]:
        records = {}
        if self.memory.previous is not None:
            records[PREVIOUS_ADAPTER_RECORD] = ArrayRecord(
                torch_state_dict=self.memory.previous
            )
        if self.memory.fisher is not None:
            records[FISHER_RECORD] = ArrayRecord(torch_state_dict=self.memory.fisher)
        return records

    # -- per-round bookkeeping -------------------------------------------------------
    def _round_end(self, global_round: int) -> None:
        arrays = self.strategy.current_arrays
        if arrays is not None:
            self._save(arrays, global_round)
        entry = self.strategy.rounds[-1]
        done = global_round - self.rounds_at_start
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total_rounds - global_round)
        acc = " ".join(
            f"{self.stage_names[int(k)]}={v:.3f}" for k, v in entry.accuracy.items()
        )
        log(
            INFO,
            "[fed-asr] stage %d/%d (%s) | round %d/%d | clients %d/%d answered | %s | "
            "elapsed %s | ETA %s",
            entry.stage + 1,
            len(self.stage_names),
            self.stage_names[entry.stage],
            global_round,
            self.total_rounds,
            entry.clients_answered,
            entry.clients_sampled,
            acc,
            format_seconds(elapsed),
            format_seconds(eta),
        )

    def _state(self) -> dict[str, Any]:
        return {
            "spectrum_stage": self.spectrum_stage,
            "spectrum_done": self.spectrum_stage >= self.strategy.stage,
            "rounds": [dataclasses.asdict(r) for r in self.strategy.rounds],
            "dp_releases": list(self.strategy.releases),
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.started,
        }

    def _save(self, arrays: ArrayRecord, global_round: int) -> None:
        adapter = arrays.to_torch_state_dict()
        for field_name, prefix in _MEMORY_PREFIXES.items():
            for key, value in (getattr(self.memory, field_name) or {}).items():
                adapter[prefix + key] = value
        self.checkpointer.save(
            Checkpoint(
                global_round=global_round,
                adapter=adapter,
                spectrum=self.strategy.global_spectrum,
                state=self._state(),
            )
        )

    def _restore(self, arrays: ArrayRecord) -> tuple[int, ArrayRecord]:
        checkpoint = self.checkpointer.load_latest()
        if checkpoint is None:
            log(
                INFO,
                "resume=true but no checkpoint in %s: starting fresh.",
                self.checkpointer.folder,
            )
            return 0, arrays
        state = checkpoint.state
        self.spectrum_stage = int(state["spectrum_stage"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.strategy.rounds = [RoundLog(**r) for r in state["rounds"]]
        self.strategy.releases = [int(s) for s in state.get("dp_releases", [])]
        self.strategy.global_spectrum = checkpoint.spectrum
        adapter = dict(checkpoint.adapter)
        memory: dict[str, dict[str, torch.Tensor] | None] = {}
        for field_name, prefix in _MEMORY_PREFIXES.items():
            part = {
                k[len(prefix) :]: adapter.pop(k)
                for k in list(adapter)
                if k.startswith(prefix)
            }
            memory[field_name] = part or None
        self.memory = StageMemory(**memory)
        restored = ArrayRecord(torch_state_dict=adapter)
        self.strategy.current_arrays = restored
        log(
            INFO,
            "Resuming from %s after global round %d.",
            self.checkpointer.folder,
            checkpoint.global_round,
        )
        return checkpoint.global_round, restored

    # -- outputs ----------------------------------------------------------------------
    def _write_outputs(self, T: int, R: int) -> Path:
        by_round = {r.round: r for r in self.strategy.rounds}
        matrix = AccuracyMatrix(T)
        partitions = sorted(
            {int(p) for r in self.strategy.rounds for p in r.per_client}
        )
        per_client = {str(p): AccuracyMatrix(T) for p in partitions}
        for t in range(T):
            end = by_round.get((t + 1) * R)
            if end is None:
                continue
            matrix.set_row(t, [end.accuracy.get(str(i), np.nan) for i in range(t + 1)])
            for p, row in end.per_client.items():
                per_client[str(p)].set_row(
                    t, [row.get(str(i), np.nan) for i in range(t + 1)]
                )
        curves = {
            name: [
                (r.round, r.accuracy[str(i)])
                for r in self.strategy.rounds
                if str(i) in r.accuracy
            ]
            for i, name in enumerate(self.stage_names)
        }
        rounds = [dataclasses.asdict(r) for r in self.strategy.rounds]
        totals = {
            key: sum(r[key] for r in rounds)
            for key in (
                "bytes_down_adapter",
                "bytes_down_spectrum",
                "bytes_up_adapter",
                "bytes_up_spectrum",
                "bytes_down_extra",
                "bytes_up_extra",
            )
        }
        extra = {
            "engine": self.engine,
            "method": self.cfg.method.name,
            "stream": self.cfg.data.stream
            if self.cfg.data.name == "easyvqa"
            else "manifest",
            "seed": self.cfg.seed,
            "num_clients": self.cfg.federation.num_clients,
            "rounds_per_stage": R,
            "spectrum_strategy": self.cfg.spectrum.strategy,
            "lora_aggregation": self.cfg.lora.aggregation,
            "per_client": {p: m.to_list() for p, m in per_client.items()},
            "rounds": rounds,
            "communication_bytes": totals,
            "dropped_replies": sum(len(r["dropped"]) for r in rounds),
            "failed_replies": sum(r["failures"] for r in rounds),
            "dropped": [
                {"round": r["round"], **d} for r in rounds for d in r["dropped"]
            ],
            "security": {
                "secure_spectrum": self.cfg.privacy.secure_spectrum,
                "signed": self.signing_key is not None,
                "hashed_checkpoints": self.cfg.security.hash_checkpoints,
            },
            "privacy": privacy_report(
                self.cfg, self.strategy.releases, len(self.strategy.skills)
            ),
            "wall_time_s": self.elapsed_before + time.perf_counter() - self.started,
        }
        path = write_run_outputs(
            self.out,
            self.cfg,
            self.stage_names,
            matrix,
            self.model,
            self.strategy.global_spectrum,
            extra,
            curves=curves,
            curve_xlabel="round",
            stage_boundaries=[(t + 1) * R + 0.5 for t in range(T - 1)],
        )
        log(INFO, "[fed-asr] metrics written to %s", path)
        return path
