"""S3 URIs as the API accepts them: ``s3://`` and the https forms its S3Uri pattern allows.

The API pattern is ``(https|s3)://([^/]+)/?(.*)``, so people paste console and SDK URLs:
virtual-hosted (``https://bucket.s3.us-west-2.amazonaws.com/key``), path style
(``https://s3.us-west-2.amazonaws.com/bucket/key``) and, for S3-compatible stores, a custom host
with the bucket as the first path segment. All resolve to a bucket and a key; which endpoint we
talk to is decided by the standard AWS configuration, never by the host in the URI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from optjob.errors import InputError

# S3 bucket naming rules, loosely (legacy buckets may hold upper case and underscores).
_BUCKET = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,253}[a-zA-Z0-9]$")
# bucket.s3.amazonaws.com, bucket.s3.<region>.amazonaws.com, bucket.s3-<region>.amazonaws.com,
# bucket.s3.dualstack.<region>.amazonaws.com (and the .com.cn partition).
_VIRTUAL_HOST = re.compile(
    r"^(?P<bucket>.+?)\.s3(?:[.-](?:dualstack\.)?(?P<region>[a-z0-9-]+))?\.amazonaws\.com(?:\.cn)?$"
)
_PATH_HOST = re.compile(r"^s3(?:[.-](?:dualstack\.)?(?P<region>[a-z0-9-]+))?\.amazonaws\.com(?:\.cn)?$")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key (empty for the bucket root); ``region`` only when the URI named one."""

    bucket: str
    key: str
    region: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """The key as a directory prefix: empty for the bucket root, otherwise ending in ``/``."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def child(self, relative: str) -> S3Location:
        """The object ``relative`` below this location taken as a prefix."""
        return S3Location(self.bucket, self.prefix + relative.lstrip("/"), self.region)


def _invalid(uri: str, why: str) -> InputError:
    return InputError(
        f"S3 URI {uri!r} is not valid: {why}. Use s3://bucket/key, "
        "https://bucket.s3.<region>.amazonaws.com/key or https://s3.<region>.amazonaws.com/bucket/key."
    )


def parse_s3_uri(uri: str) -> S3Location:
    """Bucket and key of ``uri``; InputError naming the accepted forms for anything else."""
    if not isinstance(uri, str) or not uri.strip():
        raise _invalid(str(uri), "it is empty")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        # Split by hand: '?' and '#' are legal in S3 keys and s3:// URIs are not URL-encoded.
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        region = None
    elif scheme == "https":
        if parts.query or parts.fragment:
            raise _invalid(uri, "query strings (presigned URLs) and fragments are not supported")
        if parts.username or parts.password:
            raise _invalid(uri, "credentials in the URI are not allowed")
        host = (parts.hostname or "").lower()
        path = unquote(parts.path)
        virtual = _VIRTUAL_HOST.match(host)
        path_style = _PATH_HOST.match(host)
        if path_style:
            bucket, _, key = path.lstrip("/").partition("/")
            region = path_style.group("region")
        elif virtual:
            bucket, key, region = virtual.group("bucket"), path.lstrip("/"), virtual.group("region")
        else:
            # An S3-compatible store at a custom endpoint: path style, the bucket comes first.
            bucket, _, key = path.lstrip("/").partition("/")
            region = None
    else:
        raise _invalid(uri, f"the scheme must be s3:// or https://, not {parts.scheme or 'none'!r}")
    if not bucket:
        raise _invalid(uri, "it names no bucket")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _invalid(uri, f"{bucket!r} is not a valid bucket name")
    return S3Location(bucket=bucket, key=key, region=region)
