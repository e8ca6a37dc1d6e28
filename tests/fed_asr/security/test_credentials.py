"""Tests of the fed-asr-credentials tool."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.verification import PolicyBuilder, Store

from fed_asr.security.credentials import create_credentials, main
from fed_asr.security.site_identity import (
    SiteIdentityError,
    load_site_identity,
    load_site_keys,
    site_keys_fingerprint,
)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_main_creates_all_files_with_private_keys_owner_only(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "creds"

    # Execute
    code = main(["--out", str(out), "--nodes", "3"])

    # Assert
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["ca.key", "ca.crt", "server.key", "server.pem", "signing.key", "signing.pub"]
        + [f"node-{i}" for i in range(3)]
        + [f"node-{i}.pub" for i in range(3)]
        + [f"site-{i}.key" for i in range(3)]
        + ["site-keys.json"]
    )
    for private in ("ca.key", "server.key", "signing.key", "node-0", "site-2.key"):
        assert (out / private).stat().st_mode & 0o777 == 0o600


def test_create_credentials_server_cert_chain_verifies_with_sans(
    tmp_path: Path,
) -> None:
    # Prepare
    sans = ["superlink.example.org", "localhost", "10.0.0.7", "::1"]

    # Execute
    paths = create_credentials(tmp_path, num_nodes=0, sans=sans)

    # Assert
    ca, server = load_cert(paths.ca_cert), load_cert(paths.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "superlink.example.org",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    verifier = (
        PolicyBuilder()
        .store(Store([ca]))
        .build_server_verifier(x509.DNSName("superlink.example.org"))
    )
    chain = verifier.verify(server, [])
    assert chain[-1] == ca
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_create_credentials_default_sans_localhost_and_loopback_ip(
    tmp_path: Path,
) -> None:
    # Execute
    paths = create_credentials(tmp_path, num_nodes=0)

    # Assert
    ca, server = load_cert(paths.ca_cert), load_cert(paths.server_cert)
    store = Store([ca])
    for name in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])


def test_create_credentials_node_keys_load_as_openssh_p384(tmp_path: Path) -> None:
    # Execute
    paths = create_credentials(tmp_path, num_nodes=2)

    # Assert
    for private_path, public_path in paths.node_keys:
        private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
        assert public_path.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key() == public
    first, second = (
        serialization.load_ssh_public_key(p.read_bytes()) for _, p in paths.node_keys
    )
    assert first != second


def test_create_credentials_signing_key_pair_is_ed25519_pem(tmp_path: Path) -> None:
    # Execute
    paths = create_credentials(tmp_path, num_nodes=0)

    # Assert
    private = serialization.load_pem_private_key(paths.signing_key.read_bytes(), None)
    public = serialization.load_pem_public_key(paths.signing_public_key.read_bytes())
    assert isinstance(private, Ed25519PrivateKey)
    assert isinstance(public, Ed25519PublicKey)
    public.verify(private.sign(b"m"), b"m")


def test_create_credentials_site_identities_are_pinned_under_their_names(
    tmp_path: Path,
) -> None:
    # Execute
    paths = create_credentials(tmp_path, num_nodes=3)

    # Assert: each identity key finds its own entry; the list holds three keys
    assert paths.site_keys is not None
    pinned = load_site_keys(paths.site_keys)
    assert sorted(pinned) == ["site-0", "site-1", "site-2"]
    for i, key_path in enumerate(paths.identity_keys):
        identity = load_site_identity(key_path, paths.site_keys)
        assert identity.name == f"site-{i}"
        signature = identity.sign(b"m")
        assert identity.verify(f"site-{i}", b"m", signature)
        assert not identity.verify(f"site-{(i + 1) % 3}", b"m", signature)
    # the file as written is its canonical text: `sha256sum` gives the fingerprint
    digest = hashlib.sha256(paths.site_keys.read_bytes()).hexdigest()
    assert site_keys_fingerprint(paths.site_keys) == digest


def test_load_site_identity_bad_files_raise_naming_the_file(tmp_path: Path) -> None:
    # Prepare: two federations; a list with one key under two names
    ours = create_credentials(tmp_path / "ours", num_nodes=2)
    theirs = create_credentials(tmp_path / "theirs", num_nodes=1)
    assert ours.site_keys is not None
    text = ours.site_keys.read_text()
    doubled = tmp_path / "doubled.json"
    doubled.write_text(
        text.replace('"site-1"', '"site-0-again"').replace(
            load_site_keys_pem(ours.site_keys, "site-1"),
            load_site_keys_pem(ours.site_keys, "site-0"),
        )
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff{")

    # Execute / Assert
    with pytest.raises(SiteIdentityError, match="is not in the site list"):
        load_site_identity(theirs.identity_keys[0], ours.site_keys)
    with pytest.raises(SiteIdentityError, match="share one public key"):
        load_site_keys(doubled)
    with pytest.raises(SiteIdentityError, match="garbage.json` is not a JSON"):
        load_site_keys(garbage)
    with pytest.raises(SiteIdentityError, match="Cannot read the identity key"):
        load_site_identity(tmp_path / "missing.key", ours.site_keys)
    with pytest.raises(SiteIdentityError, match="expected an Ed25519 identity key"):
        load_site_identity(ours.server_key, ours.site_keys)


def load_site_keys_pem(path: Path, site: str) -> str:
    """The PEM text of ``site`` in a pinned list, as JSON-escaped in the file."""
    return json.dumps(json.loads(path.read_text())["sites"][site])[1:-1]


def test_main_existing_files_refused_without_force(tmp_path: Path, capsys) -> None:
    # Prepare
    main(["--out", str(tmp_path), "--nodes", "1"])
    before = (tmp_path / "ca.crt").read_bytes()

    # Execute
    refused = main(["--out", str(tmp_path), "--nodes", "1"])
    error = capsys.readouterr().err
    forced = main(["--out", str(tmp_path), "--nodes", "1", "--force"])

    # Assert
    assert refused == 1
    assert "Refusing to overwrite" in error and "--force" in error
    assert forced == 0
    assert (tmp_path / "ca.crt").read_bytes() != before


def test_create_credentials_invalid_arguments_raise(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`--san` must be a host name or IP"):
        create_credentials(tmp_path, sans=["bad host"])
    with pytest.raises(ValueError, match="`--nodes` must be >= 0, got -1"):
        create_credentials(tmp_path, num_nodes=-1)
    assert not any(tmp_path.iterdir())
