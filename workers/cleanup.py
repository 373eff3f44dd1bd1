"""Remove what a killed pipeline left under the output prefix, and only that.

A pipeline that stops or fails normally rolls its own publish back (``optjob.storage.publish``).
One that was SIGKILLed (the out-of-memory killer, or a stop that outlived the grace period)
cannot, so the supervisor does it: it lists the prefix before the pipeline starts, and afterwards
deletes every object that was not there before, unless a manifest of this job now exists (then
the publish finished and the objects are the job's output). Objects of unknown origin that were
there before the job are never touched, nor are the status object and other reserved names.
"""

from __future__ import annotations

from optjob.storage.layout import MANIFEST_NAME, RESERVED_NAMES
from optjob.storage.publish import get_json
from optjob.storage.s3 import S3Client, storage_error
from optjob.storage.uri import parse_s3_uri


def list_prefix(client: S3Client, output_uri: str) -> set[str]:
    location = parse_s3_uri(output_uri)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.prefix)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}
    except Exception as exc:
        raise storage_error(exc, "list", location.uri) from exc


def remove_partial(client: S3Client, output_uri: str, job_arn: str, before: set[str]) -> list[str]:
    """Delete objects added since ``before`` if this job's manifest is absent; returns the keys removed."""
    location = parse_s3_uri(output_uri)
    manifest = get_json(location.child(MANIFEST_NAME).uri, client=client)
    if isinstance(manifest, dict) and manifest.get("job_arn") == job_arn:
        return []
    added = sorted(
        key for key in list_prefix(client, output_uri) - before
        if key[len(location.prefix):] not in RESERVED_NAMES
    )  # fmt: skip
    for start in range(0, len(added), 1000):
        batch = [{"Key": key} for key in added[start : start + 1000]]
        client.delete_objects(Bucket=location.bucket, Delete={"Objects": batch, "Quiet": True})
    uploads = client.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix).get("Uploads", [])
    for upload in uploads:
        client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return added
