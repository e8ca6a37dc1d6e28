"""The spectra a node keeps in its ``context.state``.

The global spectrum travels only when it changed (``spectrum-version``), so a node
keeps the last one it received; ``asr_local`` keeps its own spectrum instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord, Context, Message

from clients.records import numpy_record
from fed_asr import protocol as P
from fed_asr.spectrum import SkillSpectrum
from fed_asr.wire import record_arrays

_GLOBAL = "global-spectrum"  # ArrayRecord: the last global spectrum received
_GLOBAL_VERSION = "global-spectrum-version"  # ConfigRecord: its version
_LOCAL = "local-spectrum"  # ArrayRecord: this node's own spectrum (asr_local)


def received_spectrum(
    msg: Message, context: Context, skills: Sequence[str]
) -> SkillSpectrum | None:
    """The global spectrum of this round: from the message, else from the state.

    Raises
    ------
    RuntimeError
        The named version was never received here (e.g. the node restarted and lost
        its state): the reply is an error, and the server sends it again next round.
    """
    config = msg.content[P.CONFIG_RECORD]
    if P.SPECTRUM_RECORD in msg.content.array_records:
        record = msg.content.array_records[P.SPECTRUM_RECORD]
        spectrum = SkillSpectrum.from_arrays(record_arrays(record), tuple(skills))
        context.state[_GLOBAL] = record
        version = str(config.get(P.SPECTRUM_VERSION_KEY, ""))
        context.state[_GLOBAL_VERSION] = ConfigRecord({"version": version})
        return spectrum
    if P.SPECTRUM_VERSION_KEY not in config:
        return None
    wanted = str(config[P.SPECTRUM_VERSION_KEY])
    held = context.state.config_records.get(_GLOBAL_VERSION)
    if held is None or str(held["version"]) != wanted:
        raise RuntimeError(
            f"Global spectrum {wanted} was never received by this node (state "
            "lost?); the server sends it again in the next round."
        )
    arrays = record_arrays(context.state.array_records[_GLOBAL])
    return SkillSpectrum.from_arrays(arrays, tuple(skills))


def local_spectrum(context: Context, skills: Sequence[str]) -> SkillSpectrum | None:
    """This node's own spectrum (``asr_local``), if it has one."""
    if _LOCAL not in context.state:
        return None
    arrays = record_arrays(context.state.array_records[_LOCAL])
    return SkillSpectrum.from_arrays(arrays, tuple(skills))


def store_local(context: Context, spectrum: SkillSpectrum | None) -> None:
    """Keep ``spectrum`` as this node's own (nothing when None)."""
    if spectrum is not None:
        context.state[_LOCAL] = numpy_record(spectrum.to_arrays())
