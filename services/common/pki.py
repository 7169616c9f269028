"""The mesh's certificates and tokens: a CA, a certificate per role, a token
per user role (the `cryptography` package).

A certificate's role is its subject's organizational unit (`OU=scheduler`);
its common name says who holds it. Every certificate is good for both ends of
a TLS connection (server and client authentication), so a service presents
the same one when it serves and when it calls another service.

A token is a random string the user presents as `authorization: Bearer
<token>`; servers keep only its SHA-256 (the tokens file, one `role sha256
name` line each), so the file a server reads gives no one a token.

`local_mesh(folder, hosts)` makes (once, then reuses) everything a local
mesh needs: `python -m services.mesh demo|up` and the tests call it.
`python -m services.common.pki` issues and rotates them for a real
deployment (docs/operations.md, "Certificates and tokens").
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellmesh.auth import Credentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.roles import CLIENT_ROLE, SERVICE_ROLES, USER_ROLES

#: Names every local certificate answers to, besides the mesh's own host.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
CERT_DAYS = 825


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, role: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cellmesh")]
    if role:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    parts.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(parts)


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its certificate and key (PEM)."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def create(cls, name: str = "cellmesh local CA", days: int = CA_DAYS) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
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
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    @classmethod
    def load(cls, folder: Path) -> Authority:
        return cls((folder / "ca.pem").read_bytes(), (folder / "ca.key").read_bytes())

    def save(self, folder: Path) -> None:
        _write(folder / "ca.pem", self.cert_pem)
        _write(folder / "ca.key", self.key_pem, private=True)

    def issue(
        self, role: str, common_name: str, hosts: Sequence[str] = (), days: int = CERT_DAYS
    ) -> tuple[bytes, bytes]:
        """A certificate (PEM) and its key (PEM) for `role`, answering to
        `hosts` (DNS names or IP addresses) when it serves."""
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, role))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "cm_" + secrets.token_urlsafe(32)


def tokens_line(role: str, token: str, name: str) -> str:
    """One line of a tokens file (what the servers keep of a token)."""
    return f"{role} {token_digest(token)} {name}\n"


@dataclass(frozen=True)
class LocalPki:
    """Where a local mesh's files are (every path absolute).

    `folder/ca.pem` the CA; `folder/<role>.pem` and `.key` a certificate per
    role (services and users); `folder/tokens` the servers' tokens file;
    `folder/<role>.token` a user role's token."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, role: str) -> Path:
        return self.folder / f"{role}.pem"

    def key(self, role: str) -> Path:
        return self.folder / f"{role}.key"

    def token_file(self, role: str) -> Path:
        return self.folder / f"{role}.token"

    def token(self, role: str) -> str:
        return self.token_file(role).read_text().strip()

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens"

    def service_env(self, role: str) -> dict[str, str]:
        """The variables a service of `role` reads (services/common/auth.py)."""
        return {
            "TLS_CA_FILE": str(self.ca),
            "TLS_CERT_FILE": str(self.cert(role)),
            "TLS_KEY_FILE": str(self.key(role)),
            "AUTH_TOKENS_FILE": str(self.tokens),
        }

    def client_env(self, role: str = "operator") -> dict[str, str]:
        """The variables the `cellmesh` command reads to call as `role`."""
        return {
            "CELLMESH_CA": str(self.ca),
            "CELLMESH_CERT": str(self.cert(role)),
            "CELLMESH_KEY": str(self.key(role)),
        }

    def credentials(self, role: str = "operator", token: bool = False) -> Credentials:
        """`role`'s certificate; with `token`, the role-less `client`
        certificate and `role`'s token (a user role's)."""
        if token:
            return Credentials.from_files(
                self.ca, self.cert(CLIENT_ROLE), self.key(CLIENT_ROLE), self.token(role)
            )
        return Credentials.from_files(self.ca, self.cert(role), self.key(role))


def local_mesh(folder: Path, hosts: Sequence[str] = ()) -> LocalPki:
    """A throw-away CA, a certificate for every role and a token for every
    user role in `folder`, made once and reused while they answer to `hosts`
    and last at least a week more."""
    folder = folder.absolute()
    pki = LocalPki(folder)
    wanted = [*LOCAL_HOSTS, *hosts]
    manifest = folder / "hosts.json"
    roles = [*SERVICE_ROLES, *USER_ROLES, CLIENT_ROLE]
    try:
        known = json.loads(manifest.read_text())
        fresh = all(pki.cert(r).exists() and pki.key(r).exists() for r in roles) and all(
            pki.token_file(r).exists() for r in USER_ROLES
        )
        if fresh and set(wanted) <= set(known["hosts"]) and _valid_for(pki.cert(roles[0]), days=7):
            return pki
    except (OSError, ValueError, KeyError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca = Authority.create()
    ca.save(folder)
    for role in roles:
        cert, key = ca.issue(role, f"local-{role}", [*wanted, role] if role in SERVICE_ROLES else [])
        _write(pki.cert(role), cert)
        _write(pki.key(role), key, private=True)
    lines = []
    for role in USER_ROLES:
        token = new_token()
        _write(pki.token_file(role), token.encode() + b"\n", private=True)
        lines.append(tokens_line(role, token, f"local-{role}"))
    _write(pki.tokens, "".join(lines).encode())
    _write(manifest, json.dumps({"hosts": wanted}).encode())
    return pki


def _valid_for(cert_path: Path, days: int) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return left > datetime.timedelta(days=days)


# The command for operators.


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.pki",
        description="Issue the mesh's CA, certificates and tokens (docs/operations.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    mesh = sub.add_parser(
        "mesh", help="a CA, a certificate per role and a token per user role in --out (a new deployment)"
    )
    mesh.add_argument("--out", type=Path, required=True)
    mesh.add_argument(
        "--host", action="append", default=[], help="a name the services are reached by (repeat)"
    )
    ca = sub.add_parser("ca", help="make a new CA (ca.pem, ca.key) in --out")
    ca.add_argument("--out", type=Path, required=True)
    ca.add_argument("--days", type=int, default=CA_DAYS)
    cert = sub.add_parser("cert", help="issue a certificate for a role, signed by the CA in --ca-dir")
    cert.add_argument("role", choices=[*SERVICE_ROLES, *USER_ROLES, CLIENT_ROLE])
    cert.add_argument("--name", required=True, help="who holds it (its common name)")
    cert.add_argument("--host", action="append", default=[], help="a name it serves under (repeat)")
    cert.add_argument("--ca-dir", type=Path, required=True)
    cert.add_argument("--out", type=Path, required=True, help="writes OUT.pem and OUT.key")
    cert.add_argument("--days", type=int, default=CERT_DAYS)
    token = sub.add_parser("token", help="a new token for a user role; prints it, appends its line")
    token.add_argument("role", choices=USER_ROLES)
    token.add_argument("--name", required=True, help="who holds it (shown in the servers' logs)")
    token.add_argument("--tokens-file", type=Path, required=True, help="the servers' tokens file")
    args = parser.parse_args(argv)
    if args.command == "mesh":
        made = local_mesh(args.out, args.host)
        print(f"wrote the CA, certificates, tokens and the servers' tokens file in {made.folder}")
    elif args.command == "ca":
        Authority.create(days=args.days).save(args.out)
        print(f"wrote {args.out / 'ca.pem'} and {args.out / 'ca.key'} (keep ca.key offline)")
    elif args.command == "cert":
        hosts = [*LOCAL_HOSTS, args.role, *args.host] if args.role in SERVICE_ROLES else args.host
        pem, key = Authority.load(args.ca_dir).issue(args.role, args.name, hosts, args.days)
        out = Path(str(args.out))
        _write(out.with_name(out.name + ".pem"), pem)
        _write(out.with_name(out.name + ".key"), key, private=True)
        print(f"wrote {out}.pem and {out}.key (role {args.role}, {args.name})")
    else:
        secret = new_token()
        with args.tokens_file.open("a") as fh:
            fh.write(tokens_line(args.role, secret, args.name))
        print(secret)
        print(f"(role {args.role}; its line is in {args.tokens_file})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
