"""What the parts of `pki.service.CAService` share: the attributes its __init__ sets, declared once for the mixins
(pki/issuing.py, pki/revoking.py) that read them."""

from __future__ import annotations

from collections.abc import Callable

from .authorisation import Authoriser
from .broker import BrokerFiles
from .config import Settings
from .inventory import Inventory
from .keyholder import KeyHolder
from .metrics import CAMetrics
from .store import CertsLayout, FileSnapshot


class ServiceParts:
    """Set by CAService.__init__ (pki/service.py), which combines the operations."""

    settings: Settings
    inventory: Inventory
    metrics: CAMetrics
    layout: CertsLayout
    broker_files: BrokerFiles
    keys: KeyHolder
    gate: Authoriser
    on_revoked: list[Callable[[str], None]]
    _acl_file: FileSnapshot
