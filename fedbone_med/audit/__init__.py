"""Tamper-evident, signed audit log of training rounds, and its verifier.

Records hold identifiers, counts, hashes and statistics only -- never patient data,
tensors, file names or DICOM header values. See ``audit/GUIDE.md`` for what the log proves.
"""

from __future__ import annotations

from . import records
from .errors import AuditError
from .keys import key_id, load_private_key, load_public_key, load_public_keys
from .ledger import FrameLedger, LedgerBook
from .log import AuditLog
from .records import AggregationSummary, Record, SiteRound, iso_utc, round_record
from .site_trail import SiteAuditTrail, ensure_site_key
from .verify import VerifyReport, verify_log

__all__ = [
    "AggregationSummary", "AuditError", "AuditLog", "FrameLedger", "LedgerBook", "Record", "SiteAuditTrail",
    "SiteRound", "VerifyReport", "ensure_site_key", "iso_utc", "key_id", "load_private_key", "load_public_key",
    "load_public_keys", "records", "round_record", "verify_log",
]
