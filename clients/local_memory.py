"""Method statistics a node keeps to itself (``StageEndPlan.statistics_scope="local"``).

A method with local statistics (``ewc_local``) computes them at each stage end like
its shared twin, but merges only its own part, folds it into the memory it already
holds with the method's ``update_memory``, and keeps the result in ``context.state``.
Every later train message's memory (from the server: e.g. the previous global
adapter) is completed with it. Nothing of it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord, Context
from torch import Tensor

from fed_asr.methods import ContinualMethod, MethodMemory

_PREFIX = "local-memory-"  # ArrayRecord per statistics name in context.state


def held_local_memory(context: Context, names: Sequence[str]) -> MethodMemory:
    """The local statistics this node holds (empty before its first stage end)."""
    records = context.state.array_records
    return {
        name: records[_PREFIX + name].to_torch_state_dict()
        for name in names
        if _PREFIX + name in records
    }


def fold_local_statistics(
    context: Context,
    method: ContinualMethod,
    parts: Mapping[str, tuple[dict[str, Tensor], int]],
) -> None:
    """Merge this node's stage-end ``parts`` into the local memory it keeps.

    ``parts`` maps each local statistics name to this node's (sums, count); the
    method merges them as the server would merge one reply, then accumulates them
    into the held memory (``update_memory``, e.g. EWC's decayed Fisher sum).
    """
    names = tuple(parts)
    merged = {name: method.merge_statistics(name, [parts[name]]) for name in names}
    held = held_local_memory(context, names)
    updated = method.update_memory(held, {}, merged)
    for name in names:
        if name in updated:
            context.state[_PREFIX + name] = ArrayRecord(
                torch_state_dict={k: v.contiguous() for k, v in updated[name].items()}
            )
