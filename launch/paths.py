"""Paths that may live on local disk or in Google Cloud Storage (``gs://bucket/object``).

The trainer, Orbax, tf.io.gfile and clu all accept ``gs://`` strings, so launch tools only have to
(1) validate what the user typed, (2) join segments without mangling the ``gs://`` scheme (plain
``os.path.join`` is fine, ``pathlib.Path`` collapses ``gs://`` to ``gs:/``), and (3) decide which
local inputs must be copied to GCS before workers on other machines can read them. Joining and I/O go
through :mod:`etils.epath`, which handles both kinds of path with one API.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from etils import epath

GCS_SCHEME = "gs://"
# Bucket names: 3-63 characters (up to 222 with dots), lowercase letters, digits, -, _ and dots,
# starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_gcs(path: str | os.PathLike) -> bool:
    """True for ``gs://`` URIs."""
    return str(path).startswith(GCS_SCHEME)


def validate_gcs_uri(uri: str, what: str) -> str:
    """Checks a ``gs://bucket[/object/path]`` URI and returns it without a trailing slash.

    ``what`` names the flag or config field in error messages.
    """
    uri = str(uri)
    if not is_gcs(uri):
        raise ValueError(f"{what}={uri!r} is not a gs:// URI; expected gs://BUCKET/PATH.")
    rest = uri[len(GCS_SCHEME):].rstrip("/")
    bucket, _, obj = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"{what}={uri!r}: bucket name {bucket!r} is invalid; GCS bucket names are 3-63 lowercase "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit.")
    if re.search(r"\s", uri):
        raise ValueError(f"{what}={uri!r} contains whitespace; GCS object paths used by the trainer "
                         "must not.")
    if obj and "" in obj.split("/"):
        raise ValueError(f"{what}={uri!r} has an empty path segment ('//'); remove the extra slash.")
    if any(seg in (".", "..") for seg in obj.split("/")):
        raise ValueError(f"{what}={uri!r} has a '.' or '..' segment; GCS has no relative paths.")
    return GCS_SCHEME + rest


def join(base: str | os.PathLike, *parts: str) -> str:
    """Joins path segments onto a local path or a ``gs://`` URI and returns a string.

    Segments must be relative (no leading ``/``, no ``..``), so a segment can never escape ``base``.
    """
    for part in parts:
        part = str(part)
        if not part or part.startswith("/") or ".." in part.split("/"):
            raise ValueError(f"path segment {part!r} (joined onto {str(base)!r}) must be a non-empty "
                             "relative path without '..'.")
    if is_gcs(base):
        base = validate_gcs_uri(str(base), "base path")
    return str(epath.Path(base).joinpath(*parts))


def basename(path: str | os.PathLike) -> str:
    """Last segment of a local path or ``gs://`` URI (trailing slash ignored)."""
    return epath.Path(str(path).rstrip("/")).name


def normalize(path: str | os.PathLike, what: str) -> str:
    """Validates a ``gs://`` URI or turns a local path into an absolute one."""
    if is_gcs(path):
        return validate_gcs_uri(str(path), what)
    if not str(path):
        raise ValueError(f"{what} is empty; give a local path or a gs:// URI.")
    return os.path.abspath(os.path.expanduser(str(path)))


def stage_command(local: str, dest: str) -> list[str]:
    """``gcloud storage`` command that copies a local file or directory to ``dest`` (a gs:// URI)."""
    dest = validate_gcs_uri(dest, "staging destination")
    if os.path.isdir(local):
        return ["gcloud", "storage", "rsync", "--recursive", local, dest]
    return ["gcloud", "storage", "cp", local, dest]


def resolve_input(path: str, what: str, stage_root: Optional[str]) -> tuple[str, Optional[list[str]]]:
    """Where workers on other machines will read an input, and how it gets there.

    A ``gs://`` input is validated and used in place (no command). A local file or directory must
    exist; it is copied to ``stage_root/<what>/<basename>`` (``stage_root`` must then be a gs://
    URI) and the returned command does the copy.
    """
    if is_gcs(path):
        return validate_gcs_uri(path, what), None
    local = normalize(path, what)
    if not os.path.exists(local):
        raise FileNotFoundError(f"{what}={path!r} does not exist locally; give an existing path or a "
                                "gs:// URI that the TPU workers can read.")
    if not stage_root or not is_gcs(stage_root):
        raise ValueError(f"{what}={path!r} is local but TPU workers only share GCS; pass a gs:// "
                         f"--stage-dir (got {stage_root!r}) or upload it yourself and pass gs://...")
    dest = join(stage_root, what, basename(local))
    return dest, stage_command(local, dest)
