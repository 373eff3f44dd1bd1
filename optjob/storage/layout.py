"""Names shared by everything that reads or writes an optjob prefix in S3.

A published prefix is the model directory itself plus ``optjob-manifest.json``, written last;
a consumer treats the prefix as complete only when the manifest exists. The worker's status
object sits beside it. Neither is part of the model, so a download of the prefix skips both.
"""

from __future__ import annotations

MANIFEST_NAME = "optjob-manifest.json"
STATUS_NAME = "optjob-status.json"
PROGRESS_NAME = "optjob-progress.json"  # finished units of an unfinished job (storage/progress.py)
RESERVED_NAMES = frozenset({MANIFEST_NAME, STATUS_NAME, PROGRESS_NAME})
SHA256_METADATA = "sha256"
"""User-metadata key (``x-amz-meta-sha256``) holding each published object's hex sha256: unlike
S3's own checksums it describes the whole object even when it was uploaded in parts."""
MANIFEST_FORMAT_VERSION = 1
