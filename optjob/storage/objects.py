"""Small objects read whole: calibration texts and other job inputs named by an S3 URI.

Model files go through the transfer manager (``source``); these are a few megabytes at most, read
with one GetObject each, with the same client, credentials and error translation as the job's
other S3 traffic.
"""

from __future__ import annotations

from optjob.storage.s3 import S3Settings, make_client, storage_error
from optjob.storage.uri import parse_s3_uri


class ObjectReader:
    """``read_text(uri)`` and ``list(prefix_uri)`` over the job's S3 settings."""

    def __init__(self, settings: S3Settings | None = None) -> None:
        self._client = make_client(settings)

    def read_text(self, uri: str) -> str:
        location = parse_s3_uri(uri)
        try:
            body = self._client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
        except Exception as exc:
            raise storage_error(exc, "read", uri) from exc
        return body.decode("utf-8")

    def list(self, uri: str) -> list[str]:
        location = parse_s3_uri(uri)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=location.bucket, Prefix=location.prefix
            )
            return [f"s3://{location.bucket}/{item['Key']}" for page in pages for item in page.get("Contents", [])]
        except Exception as exc:
            raise storage_error(exc, "list", uri) from exc

    def list_objects(self, uri: str) -> list[dict[str, object]]:
        """Every object under a prefix with its size and ETag (provenance for inputs read whole)."""
        location = parse_s3_uri(uri)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=location.bucket, Prefix=location.prefix
            )
            return [
                {"uri": f"s3://{location.bucket}/{item['Key']}", "etag": item["ETag"].strip('"'), "size": item["Size"]}
                for page in pages
                for item in page.get("Contents", [])
            ]
        except Exception as exc:
            raise storage_error(exc, "list", uri) from exc

    def head(self, uri: str) -> dict[str, object]:
        """Size and ETag of one object; a missing object is the storage layer's InputError."""
        location = parse_s3_uri(uri)
        try:
            head = self._client.head_object(Bucket=location.bucket, Key=location.key)
        except Exception as exc:
            raise storage_error(exc, "read", uri) from exc
        return {"uri": uri, "etag": str(head["ETag"]).strip('"'), "size": int(head["ContentLength"])}
