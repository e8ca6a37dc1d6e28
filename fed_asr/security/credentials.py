r"""``fed-asr-credentials``: create TLS, node-authentication and signing credentials.

Writes into one folder::

    ca.key, ca.crt              certificate authority (EC P-384, self-signed)
    server.key, server.pem      SuperLink TLS key and certificate signed by the CA,
                                with the given subject alternative names
    node-<i>, node-<i>.pub      SuperNode authentication keys: EC P-384, private key
                                in OpenSSH format, public ``ecdsa-sha2-nistp384 ...``
    site-<i>.key                site identity keys (Ed25519, PEM): sign the site's
                                secure-aggregation keys and survivor sets
    site-keys.json              the pinned list: site name ``site-<i>`` -> public key
    signing.key, signing.pub    the server's Ed25519 key pair for signed global state

Usage::

    fed-asr-credentials --out certificates --nodes 2 --san localhost --san 127.0.0.1
    flower-superlink --ssl-ca-certfile certificates/ca.crt \\
        --ssl-certfile certificates/server.pem --ssl-keyfile certificates/server.key \\
        --enable-supernode-auth
    flwr supernode register certificates/node-0.pub <connection>
    flower-supernode --root-certificates certificates/ca.crt \\
        --auth-supernode-private-key certificates/node-0 \\
        --node-config "identity-key='certificates/site-0.key' \\
                       site-keys='certificates/site-keys.json' ..."
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fed_asr.security.site_identity import site_keys_fingerprint, site_keys_text

DEFAULT_SANS = ("localhost", "127.0.0.1")
_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class CredentialPaths:
    """Paths of the files written by :func:`create_credentials`."""

    ca_key: Path
    ca_cert: Path
    server_key: Path
    server_cert: Path
    node_keys: tuple[tuple[Path, Path], ...]  # (private OpenSSH, public OpenSSH)
    identity_keys: tuple[Path, ...]  # site-<i>.key, Ed25519 PEM
    site_keys: Path | None  # pinned list of the sites' public keys (None: no nodes)
    signing_key: Path
    signing_public_key: Path

    def all(self) -> list[Path]:
        """Every path, in writing order."""
        nodes = [p for pair in self.node_keys for p in pair]
        sites = [*self.identity_keys, *([self.site_keys] if self.site_keys else [])]
        return [
            self.ca_key,
            self.ca_cert,
            self.server_key,
            self.server_cert,
            *nodes,
            *sites,
            self.signing_key,
            self.signing_public_key,
        ]


def credential_paths(out_dir: str | Path, num_nodes: int) -> CredentialPaths:
    """Return the file layout inside ``out_dir`` for ``num_nodes`` SuperNodes."""
    out = Path(out_dir)
    return CredentialPaths(
        ca_key=out / "ca.key",
        ca_cert=out / "ca.crt",
        server_key=out / "server.key",
        server_cert=out / "server.pem",
        node_keys=tuple(
            (out / f"node-{i}", out / f"node-{i}.pub") for i in range(num_nodes)
        ),
        identity_keys=tuple(out / f"site-{i}.key" for i in range(num_nodes)),
        site_keys=out / "site-keys.json" if num_nodes else None,
        signing_key=out / "signing.key",
        signing_public_key=out / "signing.pub",
    )


def parse_san(value: str) -> x509.GeneralName:
    """Parse a SAN: an IP address gives ``IPAddress``, anything else ``DNSName``."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        if not value or any(c.isspace() for c in value):
            raise ValueError(
                f"`--san` must be a host name or IP, got {value!r}."
            ) from None
        return x509.DNSName(value)


def _write(path: Path, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if private:
        path.chmod(0o600)


def _pem_private(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fed-asr"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: ec.EllipticCurvePublicKey,
    days: int,
) -> x509.CertificateBuilder:
    """Builder of a certificate valid from 5 minutes ago for ``days`` days."""
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Key usage of the CA (signs certificates and CRLs) or of the server (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, name: str, days: int
) -> x509.Certificate:
    subject = _name(name)
    public = key.public_key()
    return (
        _builder(subject, subject, public, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: Sequence[str],
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    return (
        _builder(_name(sans[0]), ca_cert.subject, public, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([parse_san(s) for s in sans]), critical=False
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def create_credentials(
    out_dir: str | Path,
    num_nodes: int = 2,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
    force: bool = False,
    ca_name: str = "fed-asr CA",
) -> CredentialPaths:
    """Create the CA, SuperLink TLS, SuperNode, site identity and signing credentials.

    Parameters
    ----------
    out_dir : str | Path
        Output folder (created if needed).
    num_nodes : int
        Number of SuperNode authentication key pairs.
    sans : Sequence[str]
        Host names and IP addresses the SuperLink is reached at.
    days : int
        Validity of the certificates.
    force : bool
        Overwrite existing files.
    ca_name : str
        Common name of the CA.

    Returns
    -------
    CredentialPaths
        The files written.

    Raises
    ------
    FileExistsError
        If a target file exists and ``force`` is false (nothing is written then).
    ValueError
        If an argument is out of range.
    """
    if num_nodes < 0:
        raise ValueError(f"`--nodes` must be >= 0, got {num_nodes}.")
    if days < 1:
        raise ValueError(f"`--days` must be >= 1, got {days}.")
    if not sans:
        raise ValueError("At least one `--san` is needed.")
    for san in sans:
        parse_san(san)
    paths = credential_paths(out_dir, num_nodes)
    existing = [str(p) for p in paths.all() if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"Refusing to overwrite existing credentials {existing}; pass --force to "
            "replace them."
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(_CURVE())
    ca_cert = _ca_certificate(ca_key, ca_name, days)
    _write(paths.ca_key, _pem_private(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), False)

    server_key = ec.generate_private_key(_CURVE())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, list(sans), days)
    _write(paths.server_key, _pem_private(server_key), private=True)
    _write(
        paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), False
    )

    for i, (private_path, public_path) in enumerate(paths.node_keys):
        node_key = ec.generate_private_key(_CURVE())
        private = node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(private_path, private, private=True)
        _write(public_path, public + f" fed-asr-node-{i}\n".encode(), private=False)

    site_public = {}
    for i, identity_path in enumerate(paths.identity_keys):
        identity = Ed25519PrivateKey.generate()
        _write(identity_path, _pem_private(identity), private=True)
        site_public[f"site-{i}"] = identity.public_key()
    if paths.site_keys is not None:
        _write(paths.site_keys, site_keys_text(site_public).encode(), private=False)

    signing_key = Ed25519PrivateKey.generate()
    _write(paths.signing_key, _pem_private(signing_key), private=True)
    signing_public = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write(paths.signing_public_key, signing_public, private=False)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``fed-asr-credentials``."""
    parser = argparse.ArgumentParser(
        prog="fed-asr-credentials",
        description=(
            "Create a CA, the SuperLink TLS certificate, SuperNode authentication "
            "keys, site identity keys with their pinned list, and the server's "
            "Ed25519 signing key for a fed-asr deployment."
        ),
    )
    parser.add_argument(
        "--out", default="certificates", help="Output folder (default: certificates)."
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=2,
        help="SuperNodes (sites): node and identity keys for each (default: 2).",
    )
    parser.add_argument(
        "--san",
        action="append",
        default=None,
        help="Host name or IP of the SuperLink; repeat for several "
        f"(default: {' '.join(DEFAULT_SANS)}).",
    )
    parser.add_argument(
        "--days", type=int, default=365, help="Certificate validity (default: 365)."
    )
    parser.add_argument("--ca-name", default="fed-asr CA", help="CA common name.")
    parser.add_argument("--force", action="store_true", help="Overwrite files.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    sans = args.san or list(DEFAULT_SANS)
    try:
        paths = create_credentials(
            args.out, args.nodes, sans, args.days, args.force, args.ca_name
        )
    except (FileExistsError, ValueError) as err:
        print(f"fed-asr-credentials: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"Wrote {len(paths.all())} files to {out} (SANs: {', '.join(sans)}).")
    print(
        f"  flower-superlink --ssl-ca-certfile {paths.ca_cert} "
        f"--ssl-certfile {paths.server_cert} --ssl-keyfile {paths.server_key} "
        "--enable-supernode-auth"
    )
    nodes = zip(paths.node_keys, paths.identity_keys, strict=True)
    for (private_path, public_path), identity_path in nodes:
        print(f"  flwr supernode register {public_path} <connection>")
        print(
            f"  flower-supernode --root-certificates {paths.ca_cert} "
            f"--auth-supernode-private-key {private_path} --node-config "
            f"\"identity-key='{identity_path}' site-keys='{paths.site_keys}' ...\""
        )
    if paths.site_keys is not None:
        print(
            f"  pinned site list: {paths.site_keys} (give it to every site; "
            f"SHA-256 {site_keys_fingerprint(paths.site_keys)})"
        )
    print(
        f"  signing key: {paths.signing_key} (keep on the server), "
        f"verify key: {paths.signing_public_key} (give to clients)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
