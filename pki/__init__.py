"""The lab's PKI core: profiles, the CA, files on disk, the inventory. Depends on cryptography + stdlib
(+ SQLAlchemy for the inventory); nothing here knows about Flask or MQTT."""

from .authority import CAError, CertificateAuthority, WrongPassphrase
from .config import ConfigError, Settings

__all__ = ["CAError", "CertificateAuthority", "ConfigError", "Settings", "WrongPassphrase"]
