"""The servers' authentication settings: what is missing is named, tokens
files are checked line by line, a local mesh's certificates are reused
while they fit and made again when they do not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography import x509

from services.common import pki
from services.common.auth import MeshAuth, Refusal, identify, parse_tokens
from services.common.settings import SettingsError


def test_auth_on_names_every_missing_file() -> None:
    with pytest.raises(SettingsError) as info:
        MeshAuth.from_env({})
    for name in ("TLS_CA", "TLS_CERT", "TLS_KEY"):
        assert f"{name} is not set (or {name}_FILE)" in str(info.value)


def test_auth_off_is_said_explicitly_and_anything_else_is_refused() -> None:
    assert MeshAuth.from_env({"AUTH": "off"}) is None
    with pytest.raises(SettingsError, match="AUTH='maybe' is not valid: on or off"):
        MeshAuth.from_env({"AUTH": "maybe"})


def test_a_tokens_file_line_that_is_not_role_digest_name_is_refused() -> None:
    token = pki.new_token()
    good = pki.tokens_line("scientist", token, "alice smith")
    callers = parse_tokens("# who may call\n\n" + good)
    (caller,) = callers.values()
    assert (caller.role, caller.name) == ("scientist", "alice smith")
    assert pki.token_digest(token) in callers
    assert token not in good  # the servers' file never holds the token itself
    with pytest.raises(ValueError, match="line 2 is not `role sha256 name`"):
        parse_tokens(good + "admin " + "0" * 64 + " mallory\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_tokens("viewer tooshort bob\n")


def test_local_certificates_are_reused_and_remade_for_a_new_host(tmp_path: Path) -> None:
    first = pki.local_mesh(tmp_path / "pki")
    ca = first.ca.read_bytes()
    assert pki.local_mesh(tmp_path / "pki").ca.read_bytes() == ca
    assert (first.key("catalog").stat().st_mode & 0o777) == 0o600
    again = pki.local_mesh(tmp_path / "pki", ["10.200.0.1"])
    assert again.ca.read_bytes() != ca
    cert = x509.load_pem_x509_certificate(again.cert("catalog").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.200.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert "catalog" in names.get_values_for_type(x509.DNSName)
    units = cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in units] == ["catalog"]


def test_issuing_and_rotating_with_the_operators_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/operations.md's commands: a deployment's folder, a user's
    certificate, a new token; removing a token's line revokes it."""
    folder = tmp_path / "pki"
    assert pki.main(["mesh", "--out", str(folder), "--host", "swarm-node.example.org"]) == 0
    assert (
        pki.main(
            [
                "cert",
                "scientist",
                "--name",
                "alice",
                "--ca-dir",
                str(folder),
                "--out",
                str(tmp_path / "alice"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert pki.main(["token", "viewer", "--name", "bob", "--tokens-file", str(folder / "tokens")]) == 0
    bob = capsys.readouterr().out.strip()
    tokens = parse_tokens((folder / "tokens").read_text())

    alice = identify(tokens, (), {"x509_pem_cert": [(tmp_path / "alice.pem").read_bytes()]})
    assert (alice.role, alice.name, alice.via) == ("scientist", "alice", "certificate")
    as_bob = identify(tokens, (("authorization", f"Bearer {bob}"),), {"x509_pem_cert": [b""]})
    assert (as_bob.role, as_bob.name, as_bob.via) == ("viewer", "bob", "token")
    catalog = x509.load_pem_x509_certificate((folder / "catalog.pem").read_bytes())
    names = catalog.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"catalog", "localhost", "swarm-node.example.org"} <= set(names.get_values_for_type(x509.DNSName))

    kept = [line for line in (folder / "tokens").read_text().splitlines() if not line.endswith(" bob")]
    with pytest.raises(Refusal) as info:
        identify(parse_tokens("\n".join(kept)), (("authorization", f"Bearer {bob}"),), {})
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this mesh knows" in info.value.message
