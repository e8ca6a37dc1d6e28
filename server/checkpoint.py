"""Atomic, durable per-round checkpoints of a federated run, and resume.

Layout under ``<output_dir>/checkpoint``: one folder per saved round
(``round-000007``) holding ``adapter.safetensors``, ``spectrum.safetensors`` (if any),
``state.json`` and ``config.json`` (the resolved config, flattened; ``state.json``
holds its digest); the file ``LATEST`` names the newest complete folder. A folder is
written under a temporary name, every file and the folder are fsynced, and it is
renamed when complete; ``LATEST`` is replaced the same way. A run killed (or a
machine that loses power) at any moment leaves the previous checkpoint usable.

With ``hash_files`` each folder also holds ``MANIFEST.sha256.json`` (SHA-256 and size
of every file, signed with the server's key when it has one). Resume takes the newest
folder that is complete and matches its manifest; when that is not the one ``LATEST``
names, a WARNING names both. Resume refuses a checkpoint written with another
configuration and names the differing keys (``fed_asr.config_fingerprint``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.common import log
from safetensors.torch import load_file, save_file

from fed_asr.config import ExperimentConfig
from fed_asr.config_fingerprint import (
    RESUME_MAY_DIFFER,
    config_differences,
    config_digest,
    describe_differences,
    flatten_config,
)
from fed_asr.security.checkpoint_integrity import (
    MANIFEST_NAME,
    IntegrityError,
    verify_manifest,
    write_manifest,
)
from fed_asr.spectrum import SkillSpectrum

LATEST = "LATEST"
ADAPTER = "adapter.safetensors"
SPECTRUM = "spectrum.safetensors"
STATE = "state.json"
CONFIG = "config.json"
CONFIG_DIGEST_KEY = "config_sha256"
_ROUND_NAME = re.compile(r"round-\d{6}(-spectrum)?")


class ResumeMismatchError(ValueError):
    """Raised when a checkpoint was written with a different configuration."""


@dataclass
class Checkpoint:
    """A saved point of the run: after ``global_round`` (and its spectrum round)."""

    global_round: int
    adapter: dict[str, torch.Tensor]
    spectrum: SkillSpectrum | None
    state: dict[str, Any]


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically, fsyncing the file and its folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


class Checkpointer:
    """Saves and loads checkpoints in one folder, keeping the newest ``keep``.

    Parameters
    ----------
    folder : str | Path
        Where the checkpoints go.
    keep : int
        Number of newest checkpoints kept.
    hash_files : bool
        Write a SHA-256 manifest per checkpoint and verify it before loading.
    signing_key : Ed25519PrivateKey | None
        Also sign the manifest; loading then requires a valid signature.
    config : Mapping[str, Any] | None
        The run's flattened config (``flatten_config``): recorded in every checkpoint
        and compared on load. ``None`` records and checks nothing.
    may_differ : Iterable[str]
        Config keys (or prefixes) allowed to differ on resume.
    """

    def __init__(
        self,
        folder: str | Path,
        keep: int = 2,
        hash_files: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
        config: Mapping[str, Any] | None = None,
        may_differ: Iterable[str] = RESUME_MAY_DIFFER,
    ) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.hash_files = hash_files
        self.signing_key = signing_key
        self.config = dict(config) if config is not None else None
        self.may_differ = tuple(may_differ)

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` durably and atomically and point ``LATEST`` at it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"round-{checkpoint.global_round:06d}"
        if checkpoint.state.get("spectrum_done"):
            name += "-spectrum"
        final = self.folder / name
        tmp = self.folder / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(
            {k: v.contiguous() for k, v in checkpoint.adapter.items()}, tmp / ADAPTER
        )
        if checkpoint.spectrum is not None:
            checkpoint.spectrum.save(tmp / SPECTRUM)
        state = {**checkpoint.state, "global_round": checkpoint.global_round}
        if self.config is not None:
            (tmp / CONFIG).write_text(json.dumps(self.config, indent=1, sort_keys=True))
            state[CONFIG_DIGEST_KEY] = config_digest(self.config, self.may_differ)
        (tmp / STATE).write_text(json.dumps(state, indent=1, allow_nan=True))
        if self.hash_files:
            write_manifest(tmp, self.signing_key)
        for path in tmp.iterdir():
            _fsync_path(path)
        _fsync_path(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(self.folder)
        _durable_write_text(self.folder / LATEST, name)
        self._prune(keep_name=name)
        return final

    def _verify(self, folder: Path) -> None:
        """Refuse a checkpoint that is incomplete or does not match its manifest.

        Raises
        ------
        IntegrityError
            A file is missing, changed or unlisted, or the manifest is absent.
        SignatureError
            The manifest's signature is missing or invalid (signing key set).
        """
        for required in (STATE, ADAPTER):
            if not (folder / required).is_file():
                raise IntegrityError(
                    f"Checkpoint {folder} is incomplete: `{required}` is missing."
                )
        if not self.hash_files:
            return
        if not (folder / MANIFEST_NAME).exists():
            raise IntegrityError(
                f"Checkpoint {folder} has no {MANIFEST_NAME}; refusing to resume from "
                "an unverifiable checkpoint (set security.hash_checkpoints=false to "
                "accept it)."
            )
        public = self.signing_key.public_key() if self.signing_key else None
        verify_manifest(folder, public)

    def _check_config(self, folder: Path, state: Mapping[str, Any]) -> None:
        """Refuse a checkpoint written with another configuration, naming the keys."""
        if self.config is None:
            return
        digest = config_digest(self.config, self.may_differ)
        if state.get(CONFIG_DIGEST_KEY) == digest:
            return
        path = folder / CONFIG
        if not path.is_file():
            raise ResumeMismatchError(
                f"Refusing to resume from {folder}: it records no configuration, so "
                "it cannot be shown to belong to this run. Start a new `output_dir`."
            )
        recorded = json.loads(path.read_text(encoding="utf-8"))
        differences = config_differences(recorded, self.config, self.may_differ)
        if not differences:  # digest of another allow-list; the values agree
            return
        raise ResumeMismatchError(
            f"Refusing to resume from {folder}: it was written with a different "
            f"configuration: {describe_differences(differences)}. Resume with the "
            "recorded settings or start a new `output_dir`."
        )

    def _prune(self, keep_name: str) -> None:
        folders = sorted(p for p in self.folder.glob("round-*") if p.is_dir())
        for old in folders[: max(0, len(folders) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def _candidates(self) -> list[Path]:
        """Folders to try, newest first: ``LATEST``'s, then every other round."""
        pointer = self.folder / LATEST
        name = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        # `LATEST` only ever names a sibling round folder
        named = [self.folder / name] if _ROUND_NAME.fullmatch(name) else []
        others = sorted(
            (p for p in self.folder.glob("round-*") if p.is_dir()), reverse=True
        )
        return named + [p for p in others if p not in named]

    def load_latest(self) -> Checkpoint | None:
        """The newest intact checkpoint, or None when there is none.

        A newest checkpoint that is incomplete or fails its manifest is skipped with
        a WARNING naming it and the older one used instead.

        Raises
        ------
        IntegrityError, SignatureError
            The error of the newest checkpoint, when none is intact.
        ResumeMismatchError
            The intact checkpoint was written with another configuration.
        """
        candidates = self._candidates()
        if not candidates:
            return None
        failures: list[tuple[Path, Exception]] = []
        for folder in candidates:
            try:
                self._verify(folder)
                state = json.loads((folder / STATE).read_text(encoding="utf-8"))
                checkpoint = self._read(folder, state)
            except Exception as err:  # any unreadable checkpoint: try the previous
                failures.append((folder, err))
                continue
            self._warn_skipped(failures, folder)
            self._check_config(folder, state)
            return checkpoint
        raise failures[0][1]

    @staticmethod
    def _warn_skipped(failures: list[tuple[Path, Exception]], used: Path) -> None:
        for folder, err in failures:
            log(
                WARNING,
                "Checkpoint %s is unusable (%s); resuming from the previous intact "
                "checkpoint %s instead.",
                folder,
                err,
                used,
            )

    @staticmethod
    def _read(folder: Path, state: dict[str, Any]) -> Checkpoint:
        spectrum = (
            SkillSpectrum.load(folder / SPECTRUM)
            if (folder / SPECTRUM).exists()
            else None
        )
        return Checkpoint(
            global_round=int(state["global_round"]),
            adapter=load_file(folder / ADAPTER),
            spectrum=spectrum,
            state=state,
        )


def run_checkpointer(
    cfg: ExperimentConfig, signing_key: Ed25519PrivateKey | None
) -> Checkpointer:
    """The checkpointer of a federated run: ``<output_dir>/checkpoint``, its config."""
    return Checkpointer(
        Path(cfg.output_dir).expanduser().resolve() / "checkpoint",
        keep=cfg.federation.keep_checkpoints,
        hash_files=cfg.security.hash_checkpoints,
        signing_key=signing_key,
        config=flatten_config(cfg),
    )
