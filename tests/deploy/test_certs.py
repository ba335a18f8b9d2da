"""``genseg-fed certs``: what Flower needs, correct names, no overwrites, private keys 0600."""

from __future__ import annotations

import ipaddress
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from genseg_fed.cli import main
from genseg_fed.deploy.certs import (
    CertError,
    NodeKeyPair,
    SuperLinkCerts,
    check_node_key,
    check_superlink_certs,
    create_node_keys,
    create_superlink_certs,
    parse_san,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert_path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), {
        str(i) for i in ext.get_values_for_type(x509.IPAddress)
    }


def test_superlink_certificate_names_loopback_by_default_plus_every_san(tmp_path: Path) -> None:
    files = create_superlink_certs(tmp_path / "c", sans=["fl.hospital-net.org", "10.20.0.5", "::1"])
    dns, ips = _sans(files.cert)
    assert dns == {"localhost", "fl.hospital-net.org"}
    assert ips == {"127.0.0.1", "10.20.0.5", "::1"}
    check_superlink_certs(
        files, hosts=["127.0.0.1", "localhost", "fl.hospital-net.org", "10.20.0.5", "0.0.0.0"]
    )
    with pytest.raises(CertError, match=r"does not name '10\.20\.0\.6'"):
        check_superlink_certs(files, hosts=["10.20.0.6"])


def test_certificate_chain_is_a_proper_ca_and_server_certificate(tmp_path: Path) -> None:
    files = create_superlink_certs(tmp_path / "c")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    cert.verify_directly_issued_by(ca)
    # The same verification a TLS client does (Python's ssl, as Flower's httpx client uses).
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files.cert, files.key)
    _handshake(server, ctx, "127.0.0.1")
    _handshake(server, ctx, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, ctx, "evil.example.org")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """TLS handshake over a socket pair (no network)."""
    import socket

    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True):
                pass
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=hostname):
            pass
    finally:
        b.close()
        t.join(5)
        a.close()


def test_node_keys_are_what_flower_supernode_and_register_load(tmp_path: Path) -> None:
    (pair,) = create_node_keys(tmp_path / "k", ["hospital-a"])
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, an EC key
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # flwr supernode register: load_ssh_public_key, a NIST curve
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(public)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    check_node_key(pair.private_key)


def test_private_keys_are_0600_public_files_0644(tmp_path: Path) -> None:
    files = create_superlink_certs(tmp_path / "c")
    (pair,) = create_node_keys(tmp_path / "k", ["hospital-a"])
    for private in (files.ca_key, files.key, pair.private_key):
        assert _mode(private) == 0o600, private
    for public in (files.ca_cert, files.cert, pair.public_key):
        assert _mode(public) == 0o644, public
    assert _mode(tmp_path / "c") == 0o700 and _mode(tmp_path / "k") == 0o700


def test_private_keys_are_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        (pair,) = create_node_keys(tmp_path / "k", ["a"])
    finally:
        os.umask(old)
    assert _mode(pair.private_key) == 0o600


def test_existing_files_are_never_overwritten_without_force(tmp_path: Path) -> None:
    files = create_superlink_certs(tmp_path / "c")
    before = {p: p.read_bytes() for p in (files.ca_cert, files.ca_key, files.cert, files.key)}
    with pytest.raises(CertError, match=r"refusing to overwrite.*--force"):
        create_superlink_certs(tmp_path / "c")
    assert {p: p.read_bytes() for p in before} == before
    (pair,) = create_node_keys(tmp_path / "k", ["a"])
    key = pair.private_key.read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_node_keys(tmp_path / "k", ["b", "a"])  # nothing is written, not even b
    assert pair.private_key.read_bytes() == key and not (tmp_path / "k" / "b.key").exists()

    create_node_keys(tmp_path / "k", ["a"], force=True)
    assert pair.private_key.read_bytes() != key and _mode(pair.private_key) == 0o600
    create_superlink_certs(tmp_path / "c", force=True)
    assert files.ca_key.read_bytes() != before[files.ca_key]


def test_reuse_ca_reissues_only_the_superlink_certificate(tmp_path: Path) -> None:
    files = create_superlink_certs(tmp_path / "c")
    ca = files.ca_cert.read_bytes()
    with pytest.raises(CertError, match="refusing"):
        create_superlink_certs(tmp_path / "c", sans=["10.0.0.9"], reuse_ca=True)
    create_superlink_certs(tmp_path / "c", sans=["10.0.0.9"], reuse_ca=True, force=True)
    assert files.ca_cert.read_bytes() == ca  # hospitals keep their ca.crt
    check_superlink_certs(files, hosts=["10.0.0.9"])


@pytest.mark.parametrize("bad", ["", "a b", "-x", "x/../y", "../x", "a" * 64])
def test_bad_hospital_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CertError):
        create_node_keys(tmp_path, [bad])


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("10.1.2.3", "ip"),
        ("fe80::1", "ip"),
        ("fl.example.org", "dns"),
        ("localhost", "dns"),
        ("*.fl.org", "dns"),
    ],
)
def test_san_parsing(value: str, kind: str) -> None:
    san = parse_san(value)
    if kind == "ip":
        assert isinstance(san, x509.IPAddress) and san.value == ipaddress.ip_address(value)
    else:
        assert isinstance(san, x509.DNSName)


@pytest.mark.parametrize("bad", ["http://x", "a_b.org", "1.2.3", "x y"])
def test_bad_sans_are_refused(bad: str) -> None:
    with pytest.raises(CertError):
        parse_san(bad)


def test_loose_private_key_permissions_are_refused(tmp_path: Path) -> None:
    (pair,) = create_node_keys(tmp_path, ["a"])
    pair.private_key.chmod(0o644)
    with pytest.raises(CertError, match="chmod 600"):
        check_node_key(pair.private_key)


def test_a_certificate_from_another_ca_is_detected(tmp_path: Path) -> None:
    one = create_superlink_certs(tmp_path / "one")
    two = create_superlink_certs(tmp_path / "two")
    mixed = SuperLinkCerts(two.ca_cert, two.ca_key, one.cert, one.key)
    with pytest.raises(CertError, match="not signed by"):
        check_superlink_certs(mixed)


def test_cli_certs_init_node_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "init", "--out", str(out), "--san", "fl.example.org", "--node", "hospital-a"]) == 0
    text = capsys.readouterr().out
    assert "fl.example.org" in text and "SHA256:" in text
    assert (out / "nodes" / "hospital-a.key").is_file()
    assert main(["certs", "init", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["certs", "node", "hospital-b", "--out", str(tmp_path / "site")]) == 0
    capsys.readouterr()
    pair = NodeKeyPair.in_dir(tmp_path / "site", "hospital-b")
    assert main(["certs", "show", str(pair.public_key), str(out / "superlink.crt")]) == 0
    shown = capsys.readouterr().out
    assert "ecdsa-sha2-nistp384 SHA256:" in shown and '"sans"' in shown
