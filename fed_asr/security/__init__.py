"""Cryptography and privacy for cross-institution deployments (no Flower imports).

Modules (import them directly; this package imports nothing eagerly so that the
``fed-asr-credentials`` tool starts fast):

- :mod:`fed_asr.security.secagg`: secure aggregation of float arrays in four rounds
  (``SecAggClient``, ``SecAggServer``, ``flatten_arrays``, ``unflatten_arrays``);
- :mod:`fed_asr.security.shamir`: Shamir secret sharing over GF(2^127 - 1);
- :mod:`fed_asr.security.site_identity`: site identity keys and the pinned site list;
- :mod:`fed_asr.security.dp`: clipping, analytic Gaussian mechanism, accountant;
- :mod:`fed_asr.security.signing`: Ed25519 signatures over named arrays;
- :mod:`fed_asr.security.checkpoint_integrity`: SHA-256 manifests of checkpoints;
- :mod:`fed_asr.security.validation`: checks of client replies;
- :mod:`fed_asr.security.credentials`: the ``fed-asr-credentials`` console script.
"""

__all__ = [
    "checkpoint_integrity",
    "credentials",
    "dp",
    "secagg",
    "shamir",
    "signing",
    "site_identity",
    "validation",
]
