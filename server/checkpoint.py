"""Atomic per-round checkpoints of a federated run, and resume.

Layout under ``<output_dir>/checkpoint``: one folder per saved round
(``round-000007``) holding ``adapter.safetensors``, ``spectrum.safetensors`` (if any)
and ``state.json``; the file ``LATEST`` names the newest complete folder. A folder is
written under a temporary name and renamed when complete, and ``LATEST`` is replaced
atomically, so a run killed at any moment leaves the previous checkpoint usable.
With ``hash_files`` each folder also holds ``MANIFEST.sha256.json`` (SHA-256 and size
of every file, signed with the server's key when it has one); resume refuses a
folder whose files do not match it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file, save_file

from fed_asr.outputs import atomic_write_text
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


@dataclass
class Checkpoint:
    """A saved point of the run: after ``global_round`` (and its spectrum round)."""

    global_round: int
    adapter: dict[str, torch.Tensor]
    spectrum: SkillSpectrum | None
    state: dict[str, Any]


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
    """

    def __init__(
        self,
        folder: str | Path,
        keep: int = 2,
        hash_files: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.hash_files = hash_files
        self.signing_key = signing_key

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` atomically and point ``LATEST`` at it."""
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
        (tmp / STATE).write_text(json.dumps(state, indent=1, allow_nan=True))
        self._seal(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.folder / LATEST, name)
        self._prune(keep_name=name)
        return final

    def _seal(self, folder: Path) -> None:
        """Write the integrity manifest (and its signature) of a new checkpoint."""
        if self.hash_files:
            write_manifest(folder, self.signing_key)

    def _verify(self, folder: Path) -> None:
        """Refuse a checkpoint whose files do not match its manifest.

        Raises
        ------
        IntegrityError
            A file is missing, changed or unlisted, or the manifest is absent.
        SignatureError
            The manifest's signature is missing or invalid (signing key set).
        """
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

    def _prune(self, keep_name: str) -> None:
        folders = sorted(p for p in self.folder.glob("round-*") if p.is_dir())
        for old in folders[: max(0, len(folders) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None when there is none.

        Raises
        ------
        ValueError
            If ``LATEST`` names a folder that is missing or incomplete.
        """
        pointer = self.folder / LATEST
        if not pointer.exists():
            return None
        folder = self.folder / pointer.read_text().strip()
        if not (folder / STATE).exists() or not (folder / ADAPTER).exists():
            raise ValueError(f"Checkpoint {folder} named in {pointer} is incomplete.")
        self._verify(folder)
        state = json.loads((folder / STATE).read_text())
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
