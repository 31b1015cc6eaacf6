"""The one place featuredb opens a LanceDB database: local directories and object stores alike.

A catalogue may live on an object store (`s3://bucket/path`), so that many query servers read one
catalogue. Credentials and the endpoint come from the standard AWS environment variables, read
here and handed to LanceDB explicitly (its own lookup does not know AWS_ENDPOINT_URL_S3, and a
plain-http endpoint such as a local MinIO or moto server also needs `allow_http`):

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   credentials
    AWS_REGION or AWS_DEFAULT_REGION                               region
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL                        an S3-compatible endpoint

A database that cannot be opened (no credentials, an endpoint out of reach) is a StoreError that
says why, and which of these variables are not set.
"""

from __future__ import annotations

import datetime as dt
import os
import re

import lancedb

from featuredb.errors import StoreError
from featuredb.store.failures import reason

REMOTE_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# environment variable -> LanceDB (object_store) option; the first variable set wins
_S3_OPTIONS_FROM_ENV: dict[str, tuple[str, ...]] = {
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
}


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://, gs://, az://, ...), False for a local path."""
    return isinstance(uri, str) and bool(REMOTE_URI.match(uri))


def storage_options(uri: str) -> dict[str, str]:
    """LanceDB storage options for `uri`, taken from the environment (empty for local paths)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    options = {}
    for option, variables in _S3_OPTIONS_FROM_ENV.items():
        value = next((os.environ[v] for v in variables if os.environ.get(v)), None)
        if value is not None:
            options[option] = value
    if options.get("endpoint", "").startswith("http://"):
        options["allow_http"] = "true"
    return options


def connect(uri: str, *, consistent_reads: bool = False) -> lancedb.DBConnection:
    """Open the database at `uri`. consistent_reads: every read checks for the latest version, so
    tables see writes made through other handles or processes."""
    interval = dt.timedelta(0) if consistent_reads else None
    options = storage_options(uri)
    try:
        return lancedb.connect(uri, read_consistency_interval=interval, storage_options=options or None)
    except (OSError, RuntimeError, ValueError) as e:  # an object store that cannot be reached, a bad URI
        raise StoreError(f"cannot open the catalogue {uri}: {reason(e)}{_missing_settings(uri, options)}") from None


def _missing_settings(uri: str, options: dict[str, str]) -> str:
    """A hint for an s3:// URI opened without credentials or a region in the environment."""
    if not uri.startswith(("s3://", "s3a://")):
        return ""
    missing = [_S3_OPTIONS_FROM_ENV[option][0] for option in ("aws_access_key_id", "aws_secret_access_key", "region")
               if option not in options]
    return f" (not set: {', '.join(missing)}; for an S3-compatible store also AWS_ENDPOINT_URL)" if missing else ""


__all__ = ["REMOTE_URI", "connect", "is_remote", "storage_options"]
