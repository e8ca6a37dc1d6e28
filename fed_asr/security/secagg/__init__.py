"""Secure aggregation of float arrays (SecAgg, Bonawitz et al., CCS 2017), in rounds.

The server learns only the sum of the surviving clients' inputs. A driver (e.g. a Flower
ServerApp) moves the messages; the classes below hold the per-round state::

    server = SecAggServer(config, session, sites)        # one object per aggregation
    clients = {cid: SecAggClient(cid, config, session, identity[cid]) for cid in ids}
    book = server.collect_advertisements({c: clients[c].advertise() for c in ids})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    request = server.collect_masked_inputs(
        {c: clients[c].mask_input(arrays[c], inbox[c]) for c in inbox}
    )
    signatures = server.collect_confirmations(
        {c: clients[c].confirm(request) for c in request.survivors}
    )
    answers = {c: clients[c].unmask(request, signatures) for c in signatures}
    result = server.unmask(answers)
    result.arrays  # dict name -> summed float64 array

Round 0 (advertise): two X25519 key pairs per client, one for mask agreement and one for
share encryption, signed with the site's long-term Ed25519 identity key when it has one.
Round 1 (share): every key in the key book is checked (valid, not low-order, signed by
its pinned site); a self-mask seed ``b_i`` and the mask private key are Shamir-shared
(threshold ``t``) and each share is encrypted with AES-GCM for its recipient under a key
from X25519 + HKDF. Round 2 (masked input): fixed-point encoding modulo ``2^bits`` plus
pairwise masks (ChaCha20 keystreams, ``+`` towards larger ids, ``-`` towards smaller)
plus the self mask. Round 3 (consistency check): survivors sign the survivor set.
Round 4 (unmask): after enough valid signatures over the same set, survivors reveal
shares of the survivors' ``b`` and of the dropped clients' mask keys; the server
removes all masks. See ``docs/security.md`` for the threat model.

Modules: :mod:`.encoding` (parameters, fixed-point encoding, masks, messages),
:mod:`.authentication` (key checks, signed advertisements and survivor sets),
:mod:`.client` (``SecAggClient``) and :mod:`.server` (``SecAggServer``).
"""

from fed_asr.security.secagg.authentication import (
    PinnedSites,
    advert_message,
    check_key_book,
    public_key_problem,
    survivors_message,
)
from fed_asr.security.secagg.client import SecAggClient
from fed_asr.security.secagg.encoding import (
    SEED_BYTES,
    AdvertiseKeys,
    ArrayLayout,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    UnmaskRequest,
    UnmaskResponse,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
    pairwise_mask,
    prg_mask,
    share_points,
    threshold_from_fraction,
    unflatten_arrays,
)
from fed_asr.security.secagg.server import SecAggServer

__all__ = [
    "SEED_BYTES",
    "AdvertiseKeys",
    "ArrayLayout",
    "MaskedInput",
    "PinnedSites",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "UnmaskRequest",
    "UnmaskResponse",
    "advert_message",
    "check_key_book",
    "decode_fixed_point",
    "encode_fixed_point",
    "flatten_arrays",
    "pairwise_mask",
    "prg_mask",
    "public_key_problem",
    "share_points",
    "survivors_message",
    "threshold_from_fraction",
    "unflatten_arrays",
]
