"""Samples out of a tar: a local file read by seeking, or a ``pipe:`` command or URL read as a stream.

A shard *source* is one of:

- a local path: read with ``tarfile`` in seek mode, so a reader enters the tar at a sample by skipping member
  headers without reading their data;
- a ``pipe:`` command whose standard output is the tar (``pipe:cat /data/x.tar``,
  ``pipe:aws s3 cp s3://bucket/x.tar -``), or a URL of a scheme webdataset's ``gopen`` opens (``http://``,
  ``https://``, and ``gs://``, ``ais://``, ``hf://``, ``sftp://``, ``scp://``, ``ftps://`` through the tools
  it calls): opened with webdataset's ``gopen`` and read front to back with ``tarfile`` in stream mode. The
  samples before the first wanted one are read forward and dropped; a reader that stops before the end stops
  the command (or download) at once.

Samples are consecutive members sharing a key, by webdataset's rules (``base_plus_ext``; member suffixes
lower-cased). Either way a shard that cannot be opened, that ends early or that is damaged raises
:class:`ShardReadError` naming the shard and the sample where reading stopped; the samples completed before the
damage have been yielded, the partial one is not. A streamed source is complete only when its tar ends with
the end-of-archive blocks and its command (or download) exits successfully.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from webdataset.gopen import Pipe, gopen, gopen_schemes
from webdataset.tariterators import base_plus_ext

STREAM_SCHEMES: frozenset[str] = frozenset(scheme for scheme in gopen_schemes if scheme != "__default__")
"""URL schemes read as streams (webdataset's ``gopen`` table); ``pipe:`` commands are streamed too."""

_CURL_ERRORS = {
    6: "the host name cannot be resolved",
    7: "cannot connect to the host",
    22: "HTTP error: the file may not exist, or access is denied",
    28: "timed out",
    56: "the connection was lost",
}


_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class ShardReadError(OSError):
    """A shard that cannot be opened, or that ends early (truncated) or is damaged."""


class _Damage(Exception):
    """Raised while walking a tar's members: it ends early or is damaged (the caller names the sample)."""


def url_scheme(source: str) -> str | None:
    """The scheme of a ``scheme://...`` source (lower case), ``pipe`` for a ``pipe:`` command, else None."""
    if source.startswith("pipe:"):
        return "pipe"
    match = _URL.match(source)
    return match.group(1).lower() if match else None


def is_streamed(source: str | os.PathLike) -> bool:
    """Whether a shard source is read as a stream (a ``pipe:`` command or a URL ``gopen`` opens), not as a
    local file."""
    scheme = url_scheme(str(source))
    return scheme == "pipe" or scheme in STREAM_SCHEMES


# ----------------------------------------------------------------------------------------------------------
# Streams


class StreamReader:
    """A streamed source opened with ``gopen``: counts the bytes read and reports a failed command or download
    as :class:`ShardReadError` naming the source.

    Args:
        source: the ``pipe:`` command or URL (for messages).
        handle: what ``gopen`` returned for it (a webdataset ``Pipe``, or a plain file object).
    """

    def __init__(self, source: str, handle: Any):
        self.source = source
        self.handle = handle
        self.bytes_read = 0
        self.at_end = False  # the data has ended
        self.finished = False

    def _failure(self, err: BaseException | None) -> ShardReadError:
        status = getattr(self.handle, "status", None)
        if not isinstance(self.handle, Pipe) or status is None:
            return ShardReadError(f"cannot read shard {self.source}: {err}")
        command = self.handle.args[0][0] if self.handle.args[0] else ""
        tool = command[0] if isinstance(command, list | tuple) else "the command"
        hint = f": {_CURL_ERRORS[status]}" if tool == "curl" and status in _CURL_ERRORS else ""
        return ShardReadError(f"cannot read shard {self.source}: {tool} exited with status {status}{hint}")

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes, as soon as some are there (all of them for ``size < 0``); ``b""`` at the end."""
        try:
            if size >= 0 and isinstance(self.handle, Pipe):
                # What has arrived, without waiting for ``size`` bytes: tarfile asks again for what it lacks.
                data = self.handle.stream.read1(size)
                self.handle.check_status()
            else:
                data = self.handle.read(size)
        except OSError as err:
            raise self._failure(err) from err
        self.bytes_read += len(data)
        self.at_end = self.at_end or size < 0 or (size > 0 and not data)
        return data

    def command_failure(self) -> ShardReadError | None:
        """Once the data has ended (early): the failure of the command or download, if it failed (it is given
        a few seconds to exit), else None."""
        if not isinstance(self.handle, Pipe) or not self.at_end:
            return None
        try:
            status = self.handle.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None
        if status in self.handle.ignore_status:
            return None
        self.handle.status = status
        return self._failure(None)

    def finish(self) -> int:
        """Read to the end, wait for the command and check that it succeeded; the total bytes read."""
        while self.read(1 << 16):
            pass
        try:
            self.handle.close()
        except OSError as err:
            raise self._failure(err) from err
        self.finished = True
        return self.bytes_read

    def abort(self) -> None:
        """Stop reading: close the stream and end the command (or download) at once; never raises."""
        if self.finished:
            return
        self.finished = True
        if isinstance(self.handle, Pipe):
            if not self.handle.stream.closed:
                self.handle.stream.close()
            self.handle.proc.kill()
            self.handle.proc.wait()
            self.handle.status = self.handle.proc.returncode
        else:
            self.handle.close()


@contextmanager
def open_stream(source: str) -> Iterator[StreamReader]:
    """Open a streamed source with ``gopen``; on leaving, a source not read to its end is stopped.

    Raises:
        ShardReadError: the source cannot be opened (e.g. an unknown scheme).
    """
    try:
        handle = gopen(source, "rb")
    except (OSError, ValueError) as err:
        raise ShardReadError(f"cannot open shard {source}: {err}") from err
    reader = StreamReader(source, handle)
    try:
        yield reader
    finally:
        reader.abort()


def read_source(source: str) -> bytes:
    """The whole content of a streamed source (checked to have been read successfully)."""
    with open_stream(source) as reader:
        data = reader.read()
        reader.finish()
    return data


# ----------------------------------------------------------------------------------------------------------
# Members


MemberEntry = tuple[str, Callable[[], bytes]]
"""A regular member of a tar: its name and a function reading its data."""


def _read_member(archive: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    try:
        reader = archive.extractfile(info)
        return reader.read() if reader is not None else b""
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _Damage(f"truncated ({err})") from err


def _next_member(archive: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        info = archive.next()
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _Damage(f"truncated or damaged ({err})") from err
    archive.members = []  # members already read are not needed again: keep memory flat on long shards
    return info


def _open_archive(path: str, fileobj: Any, mode: str, **kwargs: Any) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=fileobj, mode=mode, **kwargs)
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError) as err:
        raise ShardReadError(f"shard {path} is not a readable tar ({err})") from err


def _local_members(path: str, handle: Any, size: int) -> Iterator[MemberEntry]:
    # A member whose data runs past the end of the file fails when it is read, or when the next header is
    # looked for after it: either way, as in a stream, the samples before it stay readable.
    archive = _open_archive(path, handle, "r:")
    while (info := _next_member(archive)) is not None:
        if info.isreg():
            yield info.name, partial(_read_member, archive, info)
    # A complete tar ends with two zero blocks; a file that stops right at a member boundary was cut off there
    # (its last sample may have lost members).
    if size - archive.offset < 2 * tarfile.BLOCKSIZE:
        raise _Damage("truncated (no end-of-archive)")


def _stream_members(path: str, reader: StreamReader) -> Iterator[MemberEntry]:
    archive = _open_archive(path, reader, "r|", bufsize=1 << 16)
    while (info := _next_member(archive)) is not None:
        if info.isreg():
            yield info.name, partial(_read_member, archive, info)
    end = archive.offset
    if reader.finish() - end < 2 * tarfile.BLOCKSIZE:
        raise _Damage("truncated (no end-of-archive)")


def _grouped(
    path: str,
    entries: Iterator[MemberEntry],
    start: int,
    stop: int | None,
    load: Callable[[int], bool] | None,
    fields: Callable[[str], bool] | None,
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Members grouped into samples (see :func:`iter_tar_samples`)."""
    index, key, members = -1, None, None
    try:
        for name, read in entries:
            member_key, field_name = base_plus_ext(name)
            field_name = (field_name or "").lower()
            if member_key is None or os.path.basename(member_key).startswith("__"):
                continue
            if member_key != key:
                if key is not None and index >= start:
                    yield index, key, members
                index, key = index + 1, member_key
                if stop is not None and index >= stop:
                    return
                members = {} if index >= start and (load is None or load(index)) else None
            if members is not None:
                members[field_name] = b"" if fields is not None and not fields(field_name) else read()
    except _Damage as damage:
        where = f"inside sample {index} ({key!r})" if key is not None else "before its first sample"
        raise ShardReadError(f"shard {path} is {damage}: reading stopped {where}") from damage
    if key is not None and index >= start:
        yield index, key, members


def iter_tar_samples(
    path: str,
    start: int = 0,
    stop: int | None = None,
    load: Callable[[int], bool] | None = None,
    fields: Callable[[str], bool] | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield ``(index, key, members)`` for samples ``start <= index < stop`` of a shard, in file order.

    ``path`` is a local file, a ``pipe:`` command or a URL (module docstring). Members are read only for samples
    where ``load(index)`` is true (otherwise ``None`` is yielded: a local tar seeks over their data, a stream
    reads past it); if ``fields`` is given, members whose suffix it rejects are listed with empty data.

    Raises:
        ShardReadError: the shard cannot be opened, is not a readable tar, is truncated or damaged, or its
            command (download) fails; samples completed before the damage have been yielded.
    """
    if is_streamed(path):
        with open_stream(path) as reader:
            try:
                yield from _grouped(path, _stream_members(path, reader), start, stop, load, fields)
            except ShardReadError as err:
                # Data that ends early, from a command that failed: the failure is the news.
                failure = reader.command_failure()
                if failure is None:
                    raise
                raise failure from err
        return
    try:
        size = os.path.getsize(path)
        handle = open(path, "rb")  # noqa: SIM115 (closed below; the tarfile borrows it)
    except OSError as err:
        raise ShardReadError(f"cannot open shard {path}: {err}") from err
    with handle:
        yield from _grouped(path, _local_members(path, handle, size), start, stop, load, fields)
