"""The audit log: one JSON line per API call, who did what to which job and how it ended.

Like CloudTrail it records the caller (account, principal, access key id), the operation, the
job name, the region, the outcome (``Success`` or the error code) and the request id; never the
request body, so nothing a caller sends (tags, environment values) and no secret lands here.
Each line is written with a single ``write`` to a file opened ``O_APPEND``, so the server's
uvicorn workers can share one file without interleaving lines. The file is created ``0600``.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AUDIT_LOG_ENV = "OPTJOB_AUDIT_LOG"


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        operation: str,
        outcome: str,
        request_id: str,
        account_id: str | None,
        principal: str | None,
        access_key_id: str | None,
        region: str | None,
        job_name: str | None,
        source_ip: str | None,
    ) -> None:
        entry: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "account_id": account_id,
            "principal": principal,
            "access_key_id": access_key_id,
            "region": region,
            "operation": operation,
            "job_name": job_name,
            "outcome": outcome,
            "request_id": request_id,
            "source_ip": source_ip,
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
