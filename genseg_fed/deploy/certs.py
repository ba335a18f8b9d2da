"""Certificates and keys for a TLS federation with SuperNode authentication (``genseg-fed certs``).

Two kinds of material, made with ``cryptography``:

* **TLS** (coordinator): a certificate authority (``ca.crt`` / ``ca.key``) and the SuperLink's server
  certificate (``superlink.crt`` / ``superlink.key``) signed by it. The certificate names every address
  the SuperNodes use to reach the SuperLink in its subject alternative names; ``127.0.0.1`` and
  ``localhost`` are always included, because the SuperLink's own SuperExec (which starts the ServerApp)
  connects to it over loopback with the same certificate. Hospitals receive ``ca.crt`` only.
* **SuperNode authentication** (one key pair per hospital): an EC P-384 key in OpenSSH format, which is
  what ``flower-supernode --auth-supernode-private-key`` loads (``load_ssh_private_key``, an elliptic-curve
  key) and what ``flwr supernode register`` accepts (``load_ssh_public_key``, a NIST curve). The hospital
  keeps ``<name>.key``; the coordinator registers ``<name>.pub``.

Existing files are never overwritten unless ``force=True``; private keys are written with mode 0600
(created that way, never widened afterwards), and a folder created here for them gets mode 0700.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_SANS",
    "CertError",
    "NodeKeyPair",
    "SuperLinkCerts",
    "check_node_key",
    "check_private_key_mode",
    "check_superlink_certs",
    "create_node_keys",
    "create_superlink_certs",
    "describe_certificate",
    "parse_san",
]

DEFAULT_SANS = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]{1,63}$"
)

San = x509.IPAddress | x509.DNSName


class CertError(RuntimeError):
    """Bad input, an existing file that would be overwritten, or material that does not fit together."""


@dataclass(frozen=True)
class SuperLinkCerts:
    """The coordinator's TLS files (all in one folder)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> SuperLinkCerts:
        d = Path(directory)
        return cls(d / "ca.crt", d / "ca.key", d / "superlink.crt", d / "superlink.key")


@dataclass(frozen=True)
class NodeKeyPair:
    """One hospital's SuperNode authentication keys."""

    name: str
    private_key: Path
    public_key: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str) -> NodeKeyPair:
        d = Path(directory)
        return cls(name, d / f"{name}.key", d / f"{name}.pub")


# ------------------------------------------------------------------------------------------------ inputs


def parse_san(value: str) -> San:
    """``"10.0.0.5"`` -> an IP address entry, ``"fl.hospital.org"`` -> a DNS name entry."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.match(value) or value.replace(".", "").isdigit():
        raise CertError(
            f"--san {value!r} is neither an IP address nor a host name (letters, digits, '-' and '.')"
        )
    return x509.DNSName(value.lower())


def _sans(extra: Iterable[str]) -> list[San]:
    out: list[San] = []
    for value in (*DEFAULT_SANS, *extra):
        san = parse_san(value)
        if san not in out:
            out.append(san)
    return out


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CertError(
            f"hospital name {name!r}: use letters, digits, '.', '_' and '-' (at most 63, no leading '.' or '-')"
        )
    return name


# ------------------------------------------------------------------------------------------------ writing


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise CertError(
            f"refusing to overwrite {', '.join(existing)}; pass --force to replace them (hospitals holding "
            "the old CA certificate or registered keys must then get the new ones)"
        )


def _make_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    elif not directory.is_dir():
        raise CertError(f"{directory} exists and is not a folder")


def _write(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` with ``mode`` from creation on (no window with wider permissions), atomically.

    Without ``force`` the final step is ``link()``, which fails if the file appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have removed bits we want (e.g. 0644 under umask 077)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CertError(
                    f"refusing to overwrite {path} (it appeared meanwhile); pass --force"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# ------------------------------------------------------------------------------------------------ TLS


def _new_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genseg-fed federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[San], days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    first = next((s for s in sans if str(s.value) not in DEFAULT_SANS), sans[0])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genseg-fed federation"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"genseg-fed SuperLink {first.value}"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def _load_ca(files: SuperLinkCerts) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"cannot reuse the CA in {files.ca_cert.parent}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{files.ca_key} is not the private key of {files.ca_cert}")
    return cert, key


def create_superlink_certs(
    out_dir: Path,
    *,
    sans: Iterable[str] = (),
    days: int = SERVER_DAYS,
    force: bool = False,
    reuse_ca: bool = False,
) -> SuperLinkCerts:
    """A CA and a SuperLink certificate for ``sans`` (plus 127.0.0.1 and localhost) in ``out_dir``.

    ``reuse_ca`` keeps an existing ``ca.crt`` / ``ca.key`` (hospitals keep their CA file) and only
    issues a new SuperLink certificate, e.g. for a new address.
    """
    if days < 1:
        raise CertError(f"days must be >= 1, got {days}")
    out_dir = Path(out_dir).expanduser()
    files = SuperLinkCerts.in_dir(out_dir)
    san_list = _sans(sans)
    targets = [files.cert, files.key] if reuse_ca else [files.ca_cert, files.ca_key, files.cert, files.key]
    _refuse_existing(targets, force)
    _make_dir(out_dir)
    if reuse_ca:
        ca_cert, ca_key = _load_ca(files)
    else:
        ca_cert, ca_key = _new_ca("genseg-fed federation CA", CA_DAYS)
    cert, key = _server_cert(ca_cert, ca_key, san_list, days)
    if not reuse_ca:
        _write(files.ca_key, _key_pem(ca_key), mode=PRIVATE_MODE, force=force)
        _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE, force=force)
    _write(files.key, _key_pem(key), mode=PRIVATE_MODE, force=force)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE, force=force)
    return files


# ------------------------------------------------------------------------------------------------ node keys


def create_node_keys(out_dir: Path, names: Iterable[str], *, force: bool = False) -> list[NodeKeyPair]:
    """One EC P-384 OpenSSH key pair per hospital: ``<name>.key`` (0600) and ``<name>.pub``."""
    names = [_check_name(n) for n in names]
    if not names:
        raise CertError("name at least one hospital")
    if len(set(names)) != len(names):
        raise CertError(f"hospital names repeat: {names}")
    out_dir = Path(out_dir).expanduser()
    pairs = [NodeKeyPair.in_dir(out_dir, n) for n in names]
    _refuse_existing([p for pair in pairs for p in (pair.private_key, pair.public_key)], force)
    _make_dir(out_dir)
    for pair in pairs:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(pair.private_key, private, mode=PRIVATE_MODE, force=force)
        _write(pair.public_key, public + f" genseg-fed:{pair.name}\n".encode(), mode=PUBLIC_MODE, force=force)
    return pairs


# ------------------------------------------------------------------------------------------------ checks


def check_private_key_mode(path: Path) -> None:
    """Refuse a private key that others than its owner can read or write."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        raise CertError(
            f"{path} has mode {mode:04o}: a private key must be readable by its owner only (chmod 600)"
        )


def check_node_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The public half of a SuperNode key, if Flower can use the file (OpenSSH, NIST EC curve, 0600)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CertError(f"SuperNode key {path} does not exist (make it with `genseg-fed certs node NAME`)")
    check_private_key_mode(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise CertError(f"{path}: SuperNode keys must be EC keys on a NIST curve (P-256/384/521)")
    return key.public_key()


def _san_matches(san: San, host: str) -> bool:
    if isinstance(san, x509.IPAddress):
        try:
            return san.value == ipaddress.ip_address(host)
        except ValueError:
            return False
    pattern, host = san.value.lower(), host.lower()
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def describe_certificate(path: Path) -> dict[str, object]:
    """Subject, issuer, names, validity and SHA-256 fingerprint of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        sans = [
            str(s.value) for s in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
    }


def check_superlink_certs(files: SuperLinkCerts, *, hosts: Iterable[str] = ()) -> None:
    """The SuperLink certificate is signed by the CA, valid now, and names every host in ``hosts``.

    ``ca.key`` is not needed here (keep it offline); the SuperLink's key must be 0600.
    """
    for path in (files.ca_cert, files.cert, files.key):
        if not path.is_file():
            raise CertError(f"{path} does not exist (make the files with `genseg-fed certs init`)")
    check_private_key_mode(files.key)
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"cannot read the TLS files in {files.cert.parent}: {exc}") from exc
    if key.public_key() != cert.public_key():
        raise CertError(f"{files.key} is not the private key of {files.cert}")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise CertError(f"{files.cert} is not signed by {files.ca_cert} ({type(exc).__name__})") from exc
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(
            f"{files.cert} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    try:
        sans = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    for host in hosts:
        if host in ("0.0.0.0", "::"):  # bind-all: SuperExec connects over loopback, checked via DEFAULT_SANS
            host = "127.0.0.1"
        if not any(_san_matches(s, host) for s in sans):
            names = [str(s.value) for s in sans]
            raise CertError(
                f"{files.cert} does not name {host!r} (its names: {names}); SuperNodes would refuse it. "
                f"Re-issue it: genseg-fed certs init --out {files.cert.parent} --reuse-ca --force --san {host}"
            )
