"""Page-cache prewarm: read a model's weight files on the GPU host while its container starts.

vLLM memory-maps safetensors and faults them in 4 KiB pages; on network storage that is many
small high-latency reads, while large sequential reads run at the storage's full speed (the
field report's 140 GB took 10-15 min through mmap on shared storage). The launch job starts
:func:`start` before it creates the container, so the reads overlap the image start and engine
imports; by the time vLLM opens the files they come from the page cache. Bounded threads, large
sequential reads (``sendfile`` to /dev/null, which fills the page cache without copying; else
``preadv`` into one reusable buffer per thread) with ``posix_fadvise(WILLNEED)`` ahead of them,
cancellable, and never started when the files would not fit in a fraction of the host's
available memory (a prewarm must not evict a running engine's memory or push the host into swap)::

    files = weight_files(Path("/fsx/models/team-a/Llama-3.3-70B-Instruct"))
    result = Prewarmer(files, threads=4).run()     # PrewarmResult(bytes_read=..., seconds=...)
    handle = start(deployment)                      # in the launch job; returns at once
    cancel(deployment.pk)                           # stop, delete, failure, or ready
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2
# Files vLLM loads weights from; config and tokenizer files are small and read anyway.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# 64 MiB units of work: large enough to be sequential on any storage, small enough that four
# threads share one file evenly. vLLM's own prefetch reads in 16 MiB blocks (weight_utils.py).
CHUNK_BYTES = 64 * MIB
BLOCK_BYTES = 16 * MIB
DEFAULT_THREADS = 4
PROGRESS_EVERY_S = 2.0
# sendfile(2) to /dev/null is refused by some filesystems (FUSE mounts among them): then read.
SENDFILE_REFUSED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@dataclass(frozen=True)
class Progress:
    """How far a prewarm has got: bytes read of the total, and the rate so far."""

    bytes_read: int
    total_bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"prewarming {self.total_bytes / GIB:.1f} GiB: {self.bytes_read / GIB:.1f} GiB read, "
            f"{self.rate / GIB:.2f} GiB/s"
        )


@dataclass(frozen=True)
class PrewarmResult:
    """What a prewarm did: ``skipped`` names why nothing was read; ``cancelled`` that it stopped
    early; ``errors`` lists files that could not be read (the engine will report them too)."""

    files: int
    total_bytes: int
    bytes_read: int
    seconds: float
    skipped: str = ""
    cancelled: bool = False
    errors: tuple[str, ...] = ()

    @property
    def rate(self) -> float:
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "total_bytes": self.total_bytes,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "bytes_per_second": round(self.rate),
            "skipped": self.skipped,
            "cancelled": self.cancelled,
            "errors": list(self.errors),
        }


def weight_files(directory: Path) -> list[Path]:
    """The weight files in a model directory (recursively, symlinks resolved once each, as in a
    Hugging Face snapshot), largest first so the long reads start early."""
    found: dict[Path, int] = {}
    for path in directory.rglob("*"):
        if path.suffix not in WEIGHT_SUFFIXES:
            continue
        try:
            real = path.resolve(strict=True)
            if real.is_file():
                found[real] = real.stat().st_size
        except OSError:
            continue
    return sorted(found, key=lambda p: (-found[p], str(p)))


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The kernel's estimate of memory available without swapping (``MemAvailable``)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable line in {meminfo}")


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages now in the page cache (``mincore``, as ``fincore`` and
    ``vmtouch`` report it, without reading anything)."""
    size = path.stat().st_size
    if size == 0:
        return 1.0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = ctypes.create_string_buffer(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in vector.raw) / pages


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean pages (``POSIX_FADV_DONTNEED``); written pages
    are flushed first, since dirty pages cannot be dropped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fits_in_memory(total_bytes: int, available_bytes: int, fraction: float) -> str:
    """Empty when ``total_bytes`` fits in ``fraction`` of available memory, else why not (the
    same rule as vLLM's auto-prefetch, which stops at 90% of RAM)."""
    budget = int(available_bytes * fraction)
    if total_bytes <= budget:
        return ""
    return (
        f"the weights ({total_bytes / GIB:.1f} GiB) exceed {fraction:.0%} of the host's available "
        f"memory ({available_bytes / GIB:.1f} GiB): reading them would evict other pages"
    )


class Prewarmer:
    """Read ``files`` into the page cache with ``threads`` parallel sequential readers.

    Work is a queue of 64 MiB chunks in file order, so the threads read neighbouring chunks
    (sequential for the storage) and finish together. Each chunk goes through ``sendfile`` to
    /dev/null (no copy to user space); where a filesystem refuses that, through ``preadv`` into
    one reusable buffer per thread (``zero_copy=False`` forces that path). ``on_progress`` is
    called at most every ``progress_every_s`` from a reader thread, and once at the end;
    setting ``cancel`` stops every reader after its current block.
    """

    def __init__(
        self,
        files: Iterable[Path],
        *,
        threads: int = DEFAULT_THREADS,
        block_bytes: int = BLOCK_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        cancel: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = PROGRESS_EVERY_S,
        zero_copy: bool = True,
    ) -> None:
        self.files = list(files)
        self.threads = max(1, min(threads, 64))
        self.block_bytes = block_bytes
        self.chunk_bytes = max(chunk_bytes, block_bytes)
        self.cancel = cancel or threading.Event()
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        self.sizes = {path: path.stat().st_size for path in self.files}
        self.total_bytes = sum(self.sizes.values())
        self._lock = threading.Lock()
        self._chunks = self._plan()
        self._next = 0
        self._read = 0
        self._errors: dict[str, str] = {}
        self._started = 0.0
        self._last_report = 0.0
        self._zero_copy = zero_copy

    def _plan(self) -> list[tuple[Path, int, int]]:
        return [
            (path, offset, min(self.chunk_bytes, size - offset))
            for path, size in self.sizes.items()
            for offset in range(0, size, self.chunk_bytes)
        ]

    def run(self) -> PrewarmResult:
        """Read everything (or until cancelled); returns when every reader has finished."""
        self._started = self._last_report = time.monotonic()
        workers = [
            threading.Thread(target=self._reader, name=f"berth-prewarm-{i}", daemon=True)
            for i in range(min(self.threads, max(len(self._chunks), 1)))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.monotonic() - self._started
        if self.on_progress is not None:
            self.on_progress(Progress(self._read, self.total_bytes, seconds))
        return PrewarmResult(
            files=len(self.files),
            total_bytes=self.total_bytes,
            bytes_read=self._read,
            seconds=seconds,
            cancelled=self.cancel.is_set() and self._read < self.total_bytes,
            errors=tuple(f"{path}: {error}" for path, error in sorted(self._errors.items())),
        )

    def _take(self) -> tuple[Path, int, int] | None:
        with self._lock:
            if self._next >= len(self._chunks) or self.cancel.is_set():
                return None
            chunk = self._chunks[self._next]
            self._next += 1
            return chunk

    def _reader(self) -> None:
        sink = os.open(os.devnull, os.O_WRONLY)
        buffer: memoryview | None = None  # allocated only if sendfile is refused
        descriptors: dict[Path, int] = {}
        try:
            while (chunk := self._take()) is not None:
                path, offset, length = chunk
                if str(path) in self._errors:
                    continue
                try:
                    if path not in descriptors:
                        descriptors[path] = os.open(path, os.O_RDONLY)
                    if self._zero_copy:
                        try:
                            self._send_chunk(descriptors[path], sink, offset, length)
                            continue
                        except OSError as exc:
                            if exc.errno not in SENDFILE_REFUSED:
                                raise
                            self._zero_copy = False
                    buffer = buffer or memoryview(bytearray(self.block_bytes))
                    self._read_chunk(descriptors[path], buffer, offset, length)
                except OSError as exc:
                    with self._lock:
                        self._errors[str(path)] = exc.strerror or str(exc)
        finally:
            for descriptor in [*descriptors.values(), sink]:
                os.close(descriptor)

    def _send_chunk(self, fd: int, sink: int, offset: int, length: int) -> None:
        """Read through the page cache without copying to user space: ``sendfile`` to
        /dev/null fills the cache like a read and costs no memory copy (2x dd's rate on the
        reference machine, where a copying read is CPU-bound)."""
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        end = offset + length
        while offset < end and not self.cancel.is_set():
            count = os.sendfile(sink, fd, offset, min(self.block_bytes, end - offset))
            if count <= 0:  # the file shrank under us
                break
            offset += count
            self._count(count)

    def _read_chunk(self, fd: int, buffer: memoryview, offset: int, length: int) -> None:
        # Tell the kernel the whole chunk is wanted: it starts readahead for it at once.
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        end = offset + length
        while offset < end and not self.cancel.is_set():
            count = os.preadv(fd, [buffer[: min(self.block_bytes, end - offset)]], offset)
            if count <= 0:  # the file shrank under us
                break
            offset += count
            self._count(count)

    def _count(self, count: int) -> None:
        report = None
        with self._lock:
            self._read += count
            now = time.monotonic()
            if self.on_progress is not None and now - self._last_report >= self.progress_every_s:
                self._last_report = now
                report = Progress(self._read, self.total_bytes, now - self._started)
        if report is not None:
            self.on_progress(report)


# --- the launch's prewarm ---------------------------------------------------------------------

_running: dict[int, threading.Event] = {}
_running_lock = threading.Lock()


def wanted(storage_kind: str, setting: str | None = None) -> bool:
    """``BERTH_PREWARM``: ``on``, ``off``, or ``auto`` (on for network and object storage,
    where mmap faults are slow; local NVMe reads fast enough without it)."""
    from models_registry.models import StorageKind

    setting = setting or settings.BERTH_PREWARM
    if setting == "auto":
        return storage_kind in (StorageKind.NETWORK, StorageKind.OBJECT)
    return setting == "on"


def start(deployment: Any) -> threading.Thread | None:
    """Start prewarming the deployment's model on this host in a background thread, unless
    ``BERTH_PREWARM`` says no for its storage kind or one already runs for it. Returns the
    thread (None when not started). It runs until done, cancelled, or the process ends."""
    if not wanted(deployment.model.mount.kind):
        return None
    cancel_event = threading.Event()
    with _running_lock:
        if deployment.pk in _running:
            return None
        _running[deployment.pk] = cancel_event
    thread = threading.Thread(
        target=_run_in_thread,
        args=(deployment.pk, deployment.generation, cancel_event),
        name=f"berth-prewarm-deployment-{deployment.pk}",
        daemon=True,
    )
    thread.start()
    return thread


def cancel(deployment_pk: int) -> bool:
    """Ask a running prewarm to stop (the engine is ready, stopped or gone). True if one ran."""
    with _running_lock:
        event = _running.get(deployment_pk)
    if event is None:
        return False
    event.set()
    return True


def _run_in_thread(deployment_pk: int, generation: int, cancel_event: threading.Event) -> None:
    try:
        close_old_connections()
        run(deployment_pk, generation, cancel_event)
    except Exception:  # a prewarm is an optimisation: log it, never fail the launch for it
        logger.exception("prewarm of deployment %s failed", deployment_pk)
    finally:
        with _running_lock:
            _running.pop(deployment_pk, None)
        connection.close()


def run(
    deployment_pk: int, generation: int, cancel_event: threading.Event | None = None
) -> PrewarmResult:
    """Prewarm one deployment's model synchronously: progress events on its timeline (and the
    page's stream), one audit record at the end, with the throughput or why it was skipped."""
    from deployments.models import Deployment

    deployment = Deployment.objects.select_related("model__mount", "team").get(pk=deployment_pk)
    directory = Path(deployment.model.translation().local)
    files = weight_files(directory)
    total = sum(path.stat().st_size for path in files)
    skipped = fits_in_memory(total, available_memory_bytes(), settings.BERTH_PREWARM_RAM_FRACTION)
    if not files:
        skipped = f"no weight files under {directory}"
    if skipped:
        result = PrewarmResult(len(files), total, 0, 0.0, skipped=skipped)
        _finish(deployment, generation, result)
        return result
    _event(deployment, generation, Progress(0, total, 0.0).describe(), {"files": len(files)})
    caller = threading.current_thread()
    prewarmer = Prewarmer(
        files,
        threads=settings.BERTH_PREWARM_THREADS,
        cancel=cancel_event,
        on_progress=lambda p: _progress(deployment, generation, p, caller),
        progress_every_s=PROGRESS_EVERY_S,
    )
    result = prewarmer.run()
    _finish(deployment, generation, result)
    return result


def _progress(deployment: Any, generation: int, progress: Progress, caller: Any) -> None:
    """A progress event. Written from a reader thread (Prewarmer reports from there), its
    connection is closed at once: the thread ends with the prewarm and nothing else closes it."""
    try:
        _event(deployment, generation, progress.describe(), {})
    except DatabaseError as exc:  # a lost progress line must not stop a reader mid-checkpoint
        logger.warning("prewarm of deployment %s: progress not recorded: %s", deployment.pk, exc)
    finally:
        if threading.current_thread() is not caller:
            connection.close()


def _event(deployment: Any, generation: int, message: str, data: dict) -> None:
    from deployments.changes import publish
    from deployments.models import DeploymentEvent, EventKind

    DeploymentEvent.objects.create(
        deployment=deployment, generation=generation, kind=EventKind.PROGRESS, message=message,
        data=data,
    )  # fmt: skip
    publish(deployment.pk, "progress")


def _finish(deployment: Any, generation: int, result: PrewarmResult) -> None:
    import audit
    from audit.actions import Action, Outcome

    if result.skipped:
        message = f"prewarm skipped: {result.skipped}"
    elif result.cancelled:
        message = f"prewarm stopped after {result.bytes_read / GIB:.1f} GiB (no longer needed)"
    else:
        message = (
            f"prewarmed {result.bytes_read / GIB:.1f} GiB in {result.seconds:.1f} s "
            f"({result.rate / GIB:.2f} GiB/s)"
        )
    if result.errors:
        message += f"; {len(result.errors)} file(s) unreadable"
    _event(deployment, generation, message, result.as_json())
    audit.record(
        Action.DEPLOYMENT_PREWARMED,
        target=deployment,
        outcome=Outcome.FAILED if result.errors else Outcome.OK,
        generation=generation,
        model=deployment.model.path,
        **result.as_json(),
    )
