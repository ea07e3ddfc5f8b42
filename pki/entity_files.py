"""The folder of an entity whose key the CA holds (`certs/<name>/`: its key 0600, its certificate, the root's copy).

Read for a renewal without a CSR and for an identical `create`. Written, each file atomically (pki/store.py
`atomic_write`: temp file in the same folder, fsync, rename; keys 0600) under the certificates folder's writer lock,
by every writer of the CA's layout: the one issuing path (pki/issuance.py, after the inventory row is committed),
the generator (pki/generator.py), the native runner (the root copy a device enrols with) and bench/rig.py.
"""

from __future__ import annotations

from cryptography import x509

from .authority import CAError, PrivateKey, cert_pem, key_pem, load_certificate, load_private_key, public_key_matches
from .store import CERT_MODE, KEY_MODE, CertsLayout, atomic_write, ensure_dir, read_optional


class EntityFiles:
    """An entity's key and certificate files under one certificates folder."""

    def __init__(self, layout: CertsLayout) -> None:
        self.layout = layout

    def key(self, name: str) -> PrivateKey | None:
        """The stored key; None when there is none; CAError when it cannot be used (an encrypted one included)."""
        data = read_optional(self.layout.key(name))
        return None if data is None else load_private_key(data)

    def certificate(self, name: str) -> x509.Certificate | None:
        """The stored certificate; None when it is missing or unreadable."""
        data = read_optional(self.layout.cert(name))
        if data is None:
            return None
        try:
            return load_certificate(data)
        except CAError:
            return None

    def pair(self, name: str) -> tuple[x509.Certificate, PrivateKey] | None:
        """The stored certificate and key when both are there, readable, and belong together."""
        cert_data, key_data = read_optional(self.layout.cert(name)), read_optional(self.layout.key(name))
        if cert_data is None or key_data is None:
            return None
        try:
            cert, key = load_certificate(cert_data), load_private_key(key_data)
        except CAError:
            return None
        return (cert, key) if public_key_matches(cert, key) else None

    def write(self, name: str, cert: x509.Certificate, ca_pem: bytes, key: PrivateKey | None = None) -> None:
        """The key (when the CA made it), the certificate, then the root's copy.

        Key first: in between, the files hold a new key and the old certificate, which do not match, so a process
        following them (lab/rotation.py `PairFiles`) waits, and the generator's next run reissues; only once the
        certificate is in place do they hold a complete new pair.
        """
        ensure_dir(self.layout.entity_dir(name))
        if key is not None:
            atomic_write(self.layout.key(name), key_pem(key), KEY_MODE)
        atomic_write(self.layout.cert(name), cert_pem(cert), CERT_MODE)
        self.write_root_copy(name, ca_pem)

    def write_root_copy(self, name: str, ca_pem: bytes) -> None:
        """The root certificate next to the entity's pair (a no-op when it is there already)."""
        ensure_dir(self.layout.entity_dir(name))
        atomic_write(self.layout.ca_copy(name), ca_pem, CERT_MODE)
