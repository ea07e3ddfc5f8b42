"""The key holder: the root certificate as on disk, and the CA key once unlocked, for one process.

The root key is decrypted once (with CA_PASSPHRASE from the settings when it is set, otherwise with the first
correct `pass`) and kept in memory; later passphrases are compared in constant time against an HMAC of the
one that unlocked it. If the root certificate on disk changes (the generator made a new root), the cached
key is dropped and unlocked again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading

from cryptography import x509

from .authority import CAError, CertificateAuthority, WrongPassphrase, days_left, load_certificate, load_private_key
from .config import Settings
from .requests import UNAVAILABLE, RequestError
from .store import CertsLayout, FileSnapshot, read_optional

log = logging.getLogger("pki.service")


def longest_validity(root: x509.Certificate) -> int:
    """The longest validity a request may ask for: the root's remaining life (503 within its last day)."""
    remaining = int(days_left(root))
    if remaining < 1:
        raise RequestError(UNAVAILABLE, "the root CA expires within a day: create a new root with the generator")
    return remaining


class KeyHolder:
    """The cached root and the unlocked CA; every method raises RequestError 503 when the lab has no usable root."""

    def __init__(self, settings: Settings, layout: CertsLayout) -> None:
        self.settings = settings
        self.layout = layout
        self._state_lock = threading.Lock()  # the cached root and key
        self._mac_key = secrets.token_bytes(32)
        # Read on every request: re-read only when replaced (a stat instead of open + read).
        self._root_file = FileSnapshot(layout.ca_cert)
        self._root_pem: bytes | None = None
        self._root: x509.Certificate | None = None
        self._ca: CertificateAuthority | None = None
        self._pass_mac: bytes | None = None
        self._settings_pass_tried = False

    def root(self) -> x509.Certificate:
        """The root certificate on disk now (a new one drops the unlocked key)."""
        data = self._root_file.read()
        if data is None:
            raise RequestError(UNAVAILABLE, "the CA has no root certificate yet: run ./setup.sh certs")
        with self._state_lock:
            if data != self._root_pem:
                try:
                    root = load_certificate(data)
                except CAError:
                    raise RequestError(UNAVAILABLE, "unreadable root certificate: run ./setup.sh certs") from None
                if self._root_pem is not None:
                    log.info("the root certificate changed on disk; the CA key will be unlocked again")
                self._root_pem, self._root = data, root
                self._ca, self._pass_mac, self._settings_pass_tried = None, None, False
            assert self._root is not None
            return self._root

    def root_pem(self) -> bytes:
        """The root certificate as read from disk (public)."""
        self.root()
        assert self._root_pem is not None
        return self._root_pem

    def unlocked(self) -> CertificateAuthority | None:
        """The CA, unlocked with CA_PASSPHRASE if it was not yet; None while the key is locked."""
        self.root()
        with self._state_lock:
            self._unlock_with_settings()
            return self._ca

    def check(self, passphrase: str) -> CertificateAuthority | None:
        """The CA when `passphrase` is the one that unlocked it (compared in constant time) or unlocks it now;
        None for a wrong passphrase."""
        self.root()
        with self._state_lock:
            self._unlock_with_settings()
            if self._ca is not None and self._pass_mac is not None:
                ok = hmac.compare_digest(self._mac(passphrase), self._pass_mac)
                return self._ca if ok else None
            return self._unlock(passphrase)

    def _mac(self, passphrase: str) -> bytes:
        return hmac.new(self._mac_key, passphrase.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def _unlock(self, passphrase: str) -> CertificateAuthority | None:
        """Decrypt the root key (caller holds _state_lock); None for a wrong passphrase."""
        key_data = read_optional(self.layout.ca_key)
        if key_data is None or self._root is None:
            raise RequestError(UNAVAILABLE, "the CA key is missing: run ./setup.sh certs")
        try:
            ca = CertificateAuthority(self._root, load_private_key(key_data, passphrase))
        except WrongPassphrase:
            return None
        except CAError:
            raise RequestError(UNAVAILABLE, "the CA key does not belong to the root certificate") from None
        self._ca, self._pass_mac = ca, self._mac(passphrase)
        return ca

    def _unlock_with_settings(self) -> None:
        if self._ca is None and self.settings.ca_passphrase and not self._settings_pass_tried:
            self._settings_pass_tried = True
            if self._unlock(self.settings.ca_passphrase) is None:
                log.warning("CA_PASSPHRASE does not decrypt the CA key; the first correct request pass will")
