"""Build the configured continual stream."""

from __future__ import annotations

from fed_asr.config import DataConfig
from fed_asr.data.easyvqa import easyvqa_stream
from fed_asr.data.manifest import manifest_stream
from fed_asr.data.samples import ContinualStream


def build_stream(cfg: DataConfig, seed: int) -> ContinualStream:
    """Build the continual stream named by ``cfg.name``.

    Parameters
    ----------
    cfg : DataConfig
        ``name`` picks the source (``easyvqa`` uses ``stream``; ``manifest`` uses
        ``root``); ``stage_order``, ``skills`` and the per-stage maxima apply to both.
    seed : int
        Subsampling seed (the experiment seed).

    Returns
    -------
    ContinualStream
        The full (not yet partitioned) stream.

    Raises
    ------
    ValueError
        Unknown ``cfg.name`` or stage, or invalid skills / manifest rows.
    FileNotFoundError
        Missing manifest folder, file or image.
    """
    common = {
        "stage_order": cfg.stage_order,
        "max_train_per_stage": cfg.max_train_per_stage,
        "max_test_per_stage": cfg.max_test_per_stage,
        "skills": cfg.skills,
        "seed": seed,
    }
    if cfg.name == "easyvqa":
        return easyvqa_stream(cfg.stream, **common)
    if cfg.name == "manifest":
        if not cfg.root:
            raise ValueError("`data.root` is required when `data.name='manifest'`.")
        return manifest_stream(cfg.root, **common)
    raise ValueError(
        f"`data.name` must be one of ['easyvqa', 'manifest'], got {cfg.name!r}."
    )
