"""Server side of secure aggregation: routes the rounds and removes the masks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fed_asr.security.secagg.authentication import (
    PinnedSites,
    advert_problem,
    duplicate_advertisers,
    survivors_message,
)
from fed_asr.security.secagg.encoding import (
    SEED_BYTES,
    AdvertiseKeys,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SecAggResult,
    UnmaskRequest,
    UnmaskResponse,
    decode_fixed_point,
    pairwise_mask,
    prg_mask,
    raw_public,
    share_points,
    unflatten_arrays,
)
from fed_asr.security.shamir import reconstruct_bytes
from fed_asr.security.site_identity import verify_site_signature


class SecAggServer:
    """Server side: routes messages between rounds and removes the masks.

    Parameters
    ----------
    config : SecAggConfig
        Shared protocol parameters.
    session : bytes
        The same session identifier the clients use.
    sites : PinnedSites | None
        The pinned site list (site name -> public identity key). With it, the server
        also drops advertisements and survivor-set
        signatures that are not signed by a pinned site, so that one bad client
        cannot abort the round; the clients check them anyway.

    Attributes
    ----------
    refused : dict[int, str]
        Clients dropped by the server, with the reason (e.g. a low-order key).
    """

    def __init__(
        self,
        config: SecAggConfig,
        session: bytes = b"",
        sites: PinnedSites | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.sites = sites
        self.refused: dict[int, str] = {}
        self._book: dict[int, AdvertiseKeys] = {}
        self._group: tuple[int, ...] = ()  # U2: completed round 1
        self._inputs: dict[int, MaskedInput] = {}
        self._request: UnmaskRequest | None = None
        self._confirmed: tuple[int, ...] = ()  # U4: signed the survivor set

    def collect_advertisements(
        self, adverts: Mapping[int, AdvertiseKeys]
    ) -> dict[int, AdvertiseKeys]:
        """Round 0: drop unusable advertisements; returns the key book to broadcast.

        An advertiser with an invalid, low-order or shared public key (or, with
        ``sites``, an unsigned one) is left out and listed in :attr:`refused`.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` advertisements remain.
        """
        book = {}
        for cid, advert in adverts.items():
            problem = advert_problem(cid, advert, self.session, self.sites)
            if problem is None:
                book[cid] = advert
            else:
                self.refused[cid] = problem
        for cid, problem in duplicate_advertisers(book).items():
            self.refused[cid] = problem
            del book[cid]
        if len(book) < self.config.threshold:
            raise SecAggError(
                f"Only {len(book)} clients advertised usable keys; the threshold is "
                f"{self.config.threshold}."
            )
        self._book = book
        return dict(self._book)

    def route_shares(
        self, shares: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Round 1: route ciphertexts; returns each sender's inbox, keyed by recipient.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` clients sent shares, or a sender is unknown or
            omitted a recipient.
        """
        for sender, outbox in shares.items():
            if sender not in self._book:
                raise SecAggError(
                    f"Shares from client {sender}, which did not advertise."
                )
            missing = set(self._book) - set(outbox) - {sender}
            if missing:
                raise SecAggError(
                    f"Client {sender} sent no share for {sorted(missing)}."
                )
        if len(shares) < self.config.threshold:
            raise SecAggError(
                f"Only {len(shares)} clients sent shares; the threshold is "
                f"{self.config.threshold}."
            )
        self._group = tuple(sorted(shares))
        return {
            recipient: {s: shares[s][recipient] for s in self._group if s != recipient}
            for recipient in self._group
        }

    def collect_masked_inputs(self, inputs: Mapping[int, MaskedInput]) -> UnmaskRequest:
        """Round 2: keep the masked vectors; returns the request to send to survivors.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` inputs arrived, a sender is not in the round-1
            group, or the vectors disagree in size, layout or range.
        """
        if len(inputs) < self.config.threshold:
            raise SecAggError(
                f"Only {len(inputs)} masked inputs arrived; the threshold is "
                f"{self.config.threshold}. Cannot aggregate."
            )
        first = next(iter(inputs.values()))
        limit = np.uint64((1 << self.config.bits) - 1)
        for cid, item in inputs.items():
            if cid not in self._group or item.client_id != cid:
                raise SecAggError(f"Masked input from client {cid} is not expected.")
            if (
                item.vector.dtype != np.uint64
                or item.vector.shape != first.vector.shape
            ):
                raise SecAggError(
                    f"Masked input of client {cid} has dtype {item.vector.dtype} and "
                    f"shape {item.vector.shape}; expected uint64 {first.vector.shape}."
                )
            if item.layout != first.layout:
                raise SecAggError(f"Masked input of client {cid} has another layout.")
            if item.vector.size and item.vector.max() > limit:
                raise SecAggError(f"Masked input of client {cid} exceeds 2^bits.")
        self._inputs = dict(inputs)
        survivors = tuple(sorted(inputs))
        dropped = tuple(c for c in self._group if c not in inputs)
        self._request = UnmaskRequest(survivors, dropped)
        return self._request

    def collect_confirmations(
        self, signatures: Mapping[int, bytes]
    ) -> dict[int, bytes]:
        """Round 3: keep the survivors' signatures of the survivor set to forward.

        Returns
        -------
        dict[int, bytes]
            Signature per confirming survivor; send it with the unmask request.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` survivors confirmed, or a sender is not one.
        """
        if self._request is None:
            raise SecAggError(
                "`collect_confirmations` called before `collect_masked_inputs`."
            )
        request = self._request
        message = survivors_message(self.session, request.survivors, request.dropped)
        kept = {}
        for cid, signature in signatures.items():
            if cid not in request.survivors:
                raise SecAggError(f"Confirmation from client {cid} is not expected.")
            site = self._book[cid].site
            if self.sites is not None and not verify_site_signature(
                self.sites, site, message, signature
            ):
                self.refused[cid] = "its survivor-set signature is invalid"
                continue
            kept[cid] = signature
        if len(kept) < self.config.threshold:
            raise SecAggError(
                f"Only {len(kept)} survivors confirmed the survivor set; the "
                f"threshold is {self.config.threshold}."
            )
        self._confirmed = tuple(sorted(kept))
        return kept

    def unmask(self, responses: Mapping[int, UnmaskResponse]) -> SecAggResult:
        """Round 3: reconstruct the secrets and return the sum of the survivors' inputs.

        Raises
        ------
        SecAggError
            If fewer than ``threshold`` responses arrived, one is malformed, or a
            reconstructed mask key does not match its advertised public key.
        """
        if not self._confirmed or self._request is None:
            raise SecAggError("`unmask` called before `collect_confirmations`.")
        request, t, bits = self._request, self.config.threshold, self.config.bits
        if len(responses) < t:
            raise SecAggError(
                f"Only {len(responses)} clients answered the unmask request; "
                f"{t} shares are needed to reconstruct each secret."
            )
        points = share_points(list(self._book))
        for cid, resp in responses.items():
            if cid not in self._confirmed or resp.client_id != cid:
                raise SecAggError(f"Unmask response from client {cid} is not expected.")
            if set(resp.seed_shares) != set(request.survivors) or set(
                resp.mask_key_shares
            ) != set(request.dropped):
                raise SecAggError(f"Unmask response of client {cid} is incomplete.")

        length = next(iter(self._inputs.values())).vector.size
        total = np.zeros(length, dtype=np.uint64)
        for item in self._inputs.values():
            total = total + item.vector
        for u in request.survivors:
            shares = {points[c]: r.seed_shares[u] for c, r in responses.items()}
            seed = reconstruct_bytes(shares, t, SEED_BYTES)
            total = total - prg_mask(seed, length, bits)
        for v in request.dropped:
            shares = {points[c]: r.mask_key_shares[v] for c, r in responses.items()}
            key = X25519PrivateKey.from_private_bytes(
                reconstruct_bytes(shares, t, SEED_BYTES)
            )
            if raw_public(key) != self._book[v].mask_public_key:
                raise SecAggError(
                    f"Reconstructed mask key of dropped client {v} does not match its "
                    "advertised public key: inconsistent shares."
                )
            for u in request.survivors:
                # Client u added its mask towards v; the same mask from v's side is its
                # negation, so adding v's view cancels u's term.
                total = total + pairwise_mask(
                    key, self._book[u].mask_public_key, v, u, self.session, length, bits
                )
        vector = decode_fixed_point(total, self.config.scale, bits)
        layout = next(iter(self._inputs.values())).layout
        arrays = unflatten_arrays(vector, layout) if layout is not None else None
        return SecAggResult(vector, arrays, request.survivors)
