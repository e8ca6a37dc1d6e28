"""The federated continual run of the ServerApp: one :class:`StageEngine` over a Grid.

``fed_asr.schedule.StageSchedule`` decides what happens when (the same loop as the
central engine); this module says how a stage trains over the grid (one Flower
``start`` per round, so progress and checkpoints follow every round), how the
stage-end round runs, and what is saved. Information flows one way: the run calls
the strategy, the stage-end round and the checkpointer, and reads their results.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fed_asr import protocol as P
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig
from fed_asr.data import build_stream
from fed_asr.descriptor_layout import layer_heads
from fed_asr.methods import build_method
from fed_asr.models import load_run_base_model, resolve_device
from fed_asr.outputs import seed_everything
from fed_asr.progress import format_seconds
from fed_asr.schedule import (
    ContinualState,
    StageEndInputs,
    StageSchedule,
    stage_outcome,
    stage_rounds_decision,
)
from server.adapter_strategies import build_adapter_strategy
from server.checkpoint import Checkpoint, run_checkpointer
from server.drift_round import DriftRound
from server.ledger import RoundLedger
from server.reply_validation import ReplyGuard, make_train_reply_check
from server.run_outputs import write_federated_outputs
from server.run_tracking import RunTracking
from server.signing_key import server_signing_key
from server.stage_end import StageEndRound
from server.strategy import FedASR

_MEMORY_PREFIX = "memory/"


class FederatedRun:
    """Runs every stage of an experiment over a Flower ``Grid``.

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
        # records the config in every checkpoint; resume refuses another config
        self.checkpointer = run_checkpointer(cfg, self.signing_key)
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.ledger = RoundLedger()
        self.method = build_method(cfg.method, cfg.regularizer)
        self.lora = get_lora_aggregation(cfg.lora.aggregation)
        self.stream = build_stream(cfg.data, cfg.seed)
        self.stage_names = [s.name for s in self.stream.stages]
        # Simulation: the server knows each partition's data (docs/security.md)
        self.guard = guard = ReplyGuard.for_run(
            cfg, self.stream, self.method, simulated=engine == "simulation"
        )
        self.strategy = FedASR(
            build_adapter_strategy(cfg.federation, self.lora),
            ledger=self.ledger,
            seed=cfg.seed,
            reply_check=make_train_reply_check(cfg.security),
            signing_key=self.signing_key,
            guard=guard,
        )
        self.timeout = cfg.federation.round_timeout_s or 3600.0
        self.stage_end_round = StageEndRound(
            grid,
            self.stream.skills,
            cfg.privacy,
            cfg.security,
            self.ledger,
            self._sign,
            self.timeout,
            guard=guard,
        )
        # diagnostics only; the sums are not privatised (server/drift_round.py)
        private = cfg.privacy.dp or cfg.privacy.secure_spectrum
        self.drift_round = (
            DriftRound(grid, self.stream.skills, self._sign, self.timeout)
            if cfg.train.diagnostics and not private
            else None
        )
        self.arrays: ArrayRecord | None = None
        self.done_rounds = 0
        self.rounds_at_start = 0
        self.tracking = RunTracking(cfg, self.stage_names, len(self.stream.skills))

    def run(self) -> Path:
        """Run (or resume) the experiment and return the ``metrics.json`` path."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        self._check_spectrum_privacy()
        base, _ = load_run_base_model(
            cfg.model, cfg.data, self.stream.vocabulary(), resolve_device("cpu")
        )
        if cfg.regularizer.heads == "each":
            self.guard.set_layer_heads(cfg, layer_heads(base, cfg.regularizer.l_sel))
        self.model = self.lora.attach(base, cfg.lora, cfg.seed)
        self.arrays = ArrayRecord(
            torch_state_dict=self.lora.exchanged_state(self.model)
        )
        self._warn_on_node_count()
        state = ContinualState()
        if cfg.resume:
            state = self._restore(state)
        self.rounds_at_start = self.done_rounds
        schedule = StageSchedule(
            self.method,
            len(self.stage_names),
            cfg.spectrum,
            cfg.regularizer.cov_floor,
        )
        # Completed rounds and stage ends are skipped (resume): start at stage 0
        state = schedule.run(self, state)
        self.lora.load(self.model, self.arrays.to_torch_state_dict())
        path = write_federated_outputs(self, state)
        self.tracking.close()
        log(INFO, "[fed-asr] metrics written to %s", path)
        return path

    # -- StageEngine ---------------------------------------------------------------
    def train_stage(self, stage: int, state: ContinualState) -> None:
        """Rounds of ``stage`` until the round schedule says it is done.

        One Flower ``start`` per round. The decision reads the ledger (rounds and
        pooled training losses of this stage), so a resumed run decides alike.
        """
        fed = self.cfg.federation
        cap = (
            fed.rounds_per_stage
            if fed.schedule == "fixed"
            else fed.max_rounds_per_stage
        )
        shared = self.method.stage_end.spectrum == "shared"
        spectrum = state.spectrum if shared else None
        memory = {
            P.memory_record(name): ArrayRecord(torch_state_dict=tensors)
            for name, tensors in state.memory.items()
        }
        while True:
            rounds = self.ledger.of_stage(stage)
            if any(r.stage > stage for r in self.ledger.rounds) or len(rounds) >= cap:
                break
            if stage_rounds_decision(self.ledger.task_losses(stage), fed).done:
                break
            assert self.arrays is not None
            self.done_rounds += 1
            self.strategy.begin_round(stage, self.done_rounds, spectrum, memory)
            result = self.strategy.start(
                grid=self.grid,
                initial_arrays=self.arrays,
                num_rounds=1,
                timeout=self.timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
            )
            # Flower's Result holds an empty ArrayRecord when nothing was aggregated
            if result.arrays is not None and len(result.arrays) > 0:
                self.arrays = result.arrays
            self._save(state)
            self._log_round()
            self.tracking.round_done(
                self.ledger.last, self.stage_end_round.releases, self.done_rounds
            )
        self._report_stage(stage)
        self._measure_drift(stage)

    def _measure_drift(self, stage: int) -> None:
        """Pooled drift and grounding of every seen stage (``train.diagnostics``)."""
        if self.drift_round is None or self.arrays is None:
            return
        rows = self.drift_round.run(self.arrays, stage)
        self.tracking.drift_measured(rows, stage, step=self.done_rounds)
        shown = ", ".join(
            f"{self.stage_names[r['stage']]} {r['drift_mean']:.3f}"
            for r in rows
            if r["drift_mean"] is not None
        )
        log(INFO, "[fed-asr] drift d2/D after stage %d: %s", stage + 1, shown or "-")

    def _report_stage(self, stage: int) -> None:
        """Log the stage's rounds; warn when it ended still improving (underfit)."""
        rounds = self.ledger.of_stage(stage)
        decision = stage_outcome(self.ledger.task_losses(stage), self.cfg.federation)
        log(
            WARNING if decision.underfit else INFO,
            "[fed-asr] stage %d/%d (%s) trained for %d rounds%s",
            stage + 1,
            len(self.stage_names),
            self.stage_names[stage],
            len(rounds),
            " and is UNDERFIT: its training loss was still falling at the cap "
            "(raise `federation.max_rounds_per_stage` or `federation.local_epochs`)"
            if decision.underfit
            else "",
        )

    def collect_stage_end(
        self, stage: int, state: ContinualState, query_clients: bool
    ) -> StageEndInputs:
        """The stage-end round over the grid (when the plan needs clients)."""
        if not query_clients:
            return StageEndInputs()
        assert self.arrays is not None
        return self.stage_end_round.run(
            self.arrays,
            stage,
            self.method.stage_end,
            self.done_rounds,
            check=self.method.statistics_reason,
        )

    def global_adapter(self) -> dict[str, torch.Tensor]:
        """The current global adapter."""
        assert self.arrays is not None
        return self.arrays.to_torch_state_dict()

    def stage_end_done(self, stage: int, state: ContinualState) -> None:
        """Checkpoint the state after the stage end; track what it added."""
        self._save(state)
        self.tracking.stage_end_done(
            self.ledger.last, self.stage_end_round.releases, self.done_rounds
        )

    # -- helpers -------------------------------------------------------------------
    def _sign(self, content: Any, message_type: str, dst_node: int) -> None:
        self.strategy.sign_content(content, self.grid, message_type, dst_node)

    def _check_spectrum_privacy(self) -> None:
        from fed_asr.spectrum_strategies import get_spectrum_strategy

        strategy = get_spectrum_strategy(self.cfg.spectrum.strategy)
        if self.cfg.privacy.secure_spectrum and not strategy.secure_compatible:
            raise ValueError(
                f"`spectrum.strategy={self.cfg.spectrum.strategy}` needs each "
                "client's statistics, but `privacy.secure_spectrum=true` reveals only "
                "their sum. Use a secure-compatible strategy (pooled)."
            )

    def _warn_on_node_count(self) -> None:
        nodes = len(list(self.grid.get_node_ids()))
        wanted = self.cfg.federation.num_clients
        if nodes != wanted:
            log(
                WARNING,
                "The federation has %d SuperNodes but `federation.num_clients` "
                "is %d: the data is split into %d shares (one per SuperNode).",
                nodes,
                wanted,
                nodes,
            )

    def _log_round(self) -> None:
        entry = self.ledger.last
        assert entry is not None
        fed = self.cfg.federation
        per_stage = (
            fed.rounds_per_stage
            if fed.schedule == "fixed"
            else fed.max_rounds_per_stage
        )
        total = per_stage * len(self.stage_names)  # an upper bound under `plateau`
        done = self.done_rounds - self.rounds_at_start
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (total - self.done_rounds)
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
            self.done_rounds,
            total,
            entry.clients_answered,
            entry.clients_sampled,
            acc,
            format_seconds(elapsed),
            format_seconds(eta),
        )

    def elapsed(self) -> float:
        """Wall time of the run so far, earlier sessions (resume) included."""
        return self.elapsed_before + time.perf_counter() - self.started

    # -- checkpoints -----------------------------------------------------------------
    def _save(self, state: ContinualState) -> None:
        assert self.arrays is not None
        adapter = self.arrays.to_torch_state_dict()
        for name, tensors in state.memory.items():
            for key, value in tensors.items():
                adapter[f"{_MEMORY_PREFIX}{name}/{key}"] = value
        self.checkpointer.save(
            Checkpoint(
                global_round=self.done_rounds,
                adapter=adapter,
                spectrum=state.spectrum,
                state={
                    "stage_end_done": state.stage_end_done,
                    "rounds": self.ledger.to_list(),
                    "dp_releases": list(self.stage_end_round.releases),
                    "elapsed_s": self.elapsed(),
                },
            )
        )

    def _restore(self, state: ContinualState) -> ContinualState:
        checkpoint = self.checkpointer.load_latest()
        if checkpoint is None:
            log(
                INFO,
                "resume=true but no checkpoint in %s: starting fresh.",
                self.checkpointer.folder,
            )
            return state
        saved = checkpoint.state
        self.elapsed_before = float(saved.get("elapsed_s", 0.0))
        self.ledger.restore(saved["rounds"])
        self.stage_end_round.restore_releases(saved.get("dp_releases", []))
        adapter = dict(checkpoint.adapter)
        memory: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in adapter if k.startswith(_MEMORY_PREFIX)]:
            name, inner = key[len(_MEMORY_PREFIX) :].split("/", 1)
            memory.setdefault(name, {})[inner] = adapter.pop(key)
        self.arrays = ArrayRecord(torch_state_dict=adapter)
        self.done_rounds = checkpoint.global_round
        log(
            INFO,
            "Resuming from %s after global round %d.",
            self.checkpointer.folder,
            checkpoint.global_round,
        )
        return ContinualState(
            spectrum=checkpoint.spectrum,
            memory=memory,
            stage_end_done=int(saved.get("stage_end_done", -1)),
        )
