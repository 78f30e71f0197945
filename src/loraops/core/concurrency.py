"""Prefect global concurrency limits that loraops takes: ``gpu`` for training and generation, and one
``promote-<model>`` per registered model so alias moves are serialised across hosts in team mode.

Slots are leased: the holder renews its lease while it runs; when it dies the lease expires and the
slot is freed. A Prefect server does that with its repossessor service, which Prefect does not run in
the ephemeral (local) mode `loraops run` uses, and whose default lease storage lives in the memory of
one process. So in local mode loraops keeps leases on disk (Prefect's filesystem lease storage, shared
by every local run) and, while it waits for a slot, frees the slots whose holder is gone: expired
leases at once, and slots the database counts but no lease accounts for (a run killed under the old
storage) once they stay unaccounted for across two checks, so a run taking its slot right now is spared.
In team mode the Prefect server must keep its leases on disk too
(``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE`` = :data:`FILESYSTEM_LEASES`): with the in-memory default a
server restart forgets the leases of running holders, their slots are never released, and every later
run waits (it says so after two lease periods).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from loraops.core.errors import RegistryError
from loraops.core.paths import LOCKS_DIR
from loraops.core.utils import atomic_write

FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
WAIT_STEP_SECONDS = float(os.environ.get("LORAOPS_SLOT_WAIT_STEP_SECONDS", "15"))
LEASE_SECONDS = max(60.0, float(os.environ.get("LORAOPS_SLOT_LEASE_SECONDS", "60")))  # Prefect's minimum is 60


TEMPORARY_API = "LORAOPS_PREFECT_TEMPORARY_API"
"""Set with PREFECT_API_URL to the same URL while a `loraops run` serves Prefect's API itself for its own use
(``orchestration.temporary_server``): still local mode."""


def local_mode() -> bool:
    """No shared Prefect server: Prefect's temporary API over the user's local database (``PREFECT_API_URL`` unset,
    or set by `loraops run` to the temporary server it started)."""
    api = os.environ.get("PREFECT_API_URL")
    return not api or api == os.environ.get(TEMPORARY_API)


def local_defaults() -> None:
    """Leases on disk in local mode, so a crashed run's lease outlives it and can expire (set before Prefect starts)."""
    if local_mode():
        os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", FILESYSTEM_LEASES)


def ensure_limit(name: str, slots: int) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` if it is missing; return its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:  # a concurrent run created it first
                return client.read_global_concurrency_limit_by_name(name).limit
            return slots


def slot(name: str, timeout_seconds: float | None = None, lease_duration: float = LEASE_SECONDS,
         holder: dict[str, Any] | None = None) -> Any:
    """Hold one leased slot of the limit ``name`` (which must exist)."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=lease_duration, strict=True,
                       holder=ConcurrencyLeaseHolder(**holder) if holder else None)


class _ExpectedTimeouts(logging.Filter):
    """Prefect logs an ERROR each time a bounded slot acquisition times out; waiting_slot expects that and says
    "waiting Ns … held by …" instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("ConcurrencySlotAcquisition" in text and "TimeoutError" in text)


def _quiet_expected_timeouts() -> None:
    log = logging.getLogger("prefect._internal.concurrency")
    if not any(isinstance(f, _ExpectedTimeouts) for f in log.filters):
        log.addFilter(_ExpectedTimeouts())


@contextlib.contextmanager
def waiting_slot(name: str, say: Callable[[str], None], holder: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold a slot of ``name``, taking turns in arrival order with the other runs of this host that wait for it.

    Prefect hands a free slot to whichever waiter polls first; a :class:`Line` on this host makes them queue,
    so a run is never overtaken by runs that asked later. While waiting it says who holds the slot (project
    folder, flow run, for how long) and, in local mode, frees slots of dead holders.
    """
    _quiet_expected_timeouts()
    line = Line(name)
    waited, suspects, told = 0.0, 0, 0.0
    started = time.monotonic()
    with contextlib.ExitStack() as stack, line.ticket(holder) as ticket:
        # Short tries first: Prefect's server on SQLite sometimes answers a take "database busy" while it records
        # the previous task's end, and Prefect's client then waits 2 s before asking again; a try cut short at
        # 0.3 s asks again at once. Dead holders are looked for only while waiting (that opens the database too).
        step = min(0.3, WAIT_STEP_SECONDS)
        while True:
            ahead = line.ahead_of(ticket)
            if not ahead:
                try:
                    stack.enter_context(slot(name, timeout_seconds=step, holder=holder))
                    break
                except TimeoutError:
                    pass
            else:
                time.sleep(min(1.0, WAIT_STEP_SECONDS))
            step = min(4 * step, WAIT_STEP_SECONDS)
            if local_mode():
                suspects, freed = reclaim(name, suspects)
                if freed:
                    say(f"freed {freed} slot(s) of the Prefect concurrency limit {name!r} whose holder is gone")
            waited = time.monotonic() - started
            if waited - told >= WAIT_STEP_SECONDS:
                told = waited
                say(_wait_message(name, waited, len(ahead), line))
        line.hold(ticket)
        yield


def _wait_message(name: str, waited: float, ahead: int, line: "Line") -> str:
    queue = f"{ahead} run(s) ahead in line" if ahead else "next in line"
    holders = line.holders() or describe_holders(name)
    message = f"waiting {waited:.0f}s for the Prefect concurrency limit {name!r} ({queue}): {holders}"
    if not local_mode() and waited >= 2 * LEASE_SECONDS and int(waited) % int(4 * WAIT_STEP_SECONDS) < WAIT_STEP_SECONDS:
        message += (". If no run holds it, the Prefect server lost its leases (a restart with the default "
                    "in-memory lease storage): start the server with PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
                    f"{FILESYSTEM_LEASES} and free the slot with `prefect gcl update {name} --active-slots 0`")
    return message


class Line:
    """This host's waiters for a limit, served in arrival order; and who holds it, described for the waiters.

    Each waiter writes a ticket (arrival time, pid, project folder, flow run) into a folder beside Prefect's
    database (``$PREFECT_HOME/loraops-slots/<limit>``); only the earliest live ticket asks Prefect for a slot.
    Tickets of processes that died are ignored and removed, so a crash never blocks the line.
    """

    def __init__(self, name: str, folder: Path | None = None) -> None:
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        self.folder = folder or home / "loraops-slots" / name
        self.folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def ticket(self, holder: dict[str, Any] | None = None) -> Iterator[Path]:
        """Join the line; the ticket is removed when the block ends (slot taken, or the wait given up)."""
        info = {"pid": os.getpid(), "started": _started(os.getpid()), "since": time.time(),
                "project": str(Path.cwd().resolve()), "run": _run_name(holder)}
        path = self.folder / f"wait-{time.time_ns():020d}-{os.getpid()}.json"
        atomic_write(path, json.dumps(info))
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
            _held(path).unlink(missing_ok=True)

    def ahead_of(self, ticket: Path) -> list[dict[str, Any]]:
        """The live waiters that arrived before ``ticket``."""
        return [info for path, info in self._live("wait-") if path.name < ticket.name]

    def hold(self, ticket: Path) -> None:
        """The ticket's owner took the slot: it leaves the line and is listed as a holder (for the waiters)."""
        info = json.loads(ticket.read_text(encoding="utf-8")) | {"since": time.time()}
        atomic_write(_held(ticket), json.dumps(info))
        ticket.unlink(missing_ok=True)

    def holders(self) -> str:
        """``held by <project> · <flow run> for 2m05s`` for every live holder on this host ("" when none)."""
        now = time.time()
        parts = [f"{info['project']} · {info['run']} for {_duration(now - info['since'])}"
                 for _, info in self._live("held-")]
        return "held by " + "; ".join(parts) if parts else ""

    def _live(self, prefix: str) -> list[tuple[Path, dict[str, Any]]]:
        out = []
        for path in sorted(self.folder.glob(f"{prefix}*.json")):
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # being written, or just removed
                continue
            if _alive(info):
                out.append((path, info))
            else:
                path.unlink(missing_ok=True)
        return out


def _held(ticket: Path) -> Path:
    return ticket.with_name(ticket.name.replace("wait-", "held-", 1))


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(info: dict[str, Any]) -> bool:
    """The ticket's process still runs (the same process: a reused pid has another start time)."""
    started = _started(int(info.get("pid", 0)))
    return started is not None and (info.get("started") is None or abs(started - info["started"]) < 1.0)


def _run_name(holder: dict[str, Any] | None) -> str:
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        if flow_run.name:
            return f"flow run {flow_run.name}"
    if holder:
        return f"{holder.get('type', 'run')} {holder.get('id')}"
    return f"pid {os.getpid()}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def reclaim(name: str, suspects: int = 0) -> tuple[int, int]:
    """Local mode: free the slots of ``name`` whose holder is gone.

    Expired leases are revoked at once. A slot the database counts but no lease accounts for may belong
    to a run that is taking it this very moment (its lease not yet written), so it is freed only when it
    was already unaccounted for at the previous check (``suspects``). Returns (unaccounted now, freed).
    """
    from prefect.utilities.asyncutils import run_coro_as_sync

    return run_coro_as_sync(_reclaim(name, suspects)) or (0, 0)


def _untyped(func: Any) -> Any:
    """Prefect's ``@db_injector`` server functions, as mypy cannot see that they stay coroutine functions."""
    return func


async def _reclaim(name: str, suspects: int) -> tuple[int, int]:
    from datetime import datetime, timezone

    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.server.database import provide_database_interface
    from prefect.server.models.concurrency_limits_v2 import bulk_decrement_active_slots, read_concurrency_limit
    from prefect.server.services.repossessor import revoke_expired_lease

    db, storage = provide_database_interface(), get_concurrency_lease_storage()
    for lease_id in await storage.read_expired_lease_ids():
        await revoke_expired_lease(lease_id, db=db, lease_storage=storage)
    now = datetime.now(timezone.utc)
    async with db.session_context(begin_transaction=True) as session:
        limit = await _untyped(read_concurrency_limit)(session, name=name)
        if limit is None or not limit.active_slots:
            return 0, 0
        held = 0
        for lease_id in await storage.read_active_lease_ids(limit=1000):
            lease = await storage.read_lease(lease_id)
            if lease and limit.id in lease.resource_ids and lease.expiration > now and lease.metadata:
                held += lease.metadata.slots
        orphans = max(limit.active_slots - held, 0)
        freed = min(orphans, suspects)
        if freed:
            await _untyped(bulk_decrement_active_slots)(session=session, concurrency_limit_ids=[limit.id], slots=freed)
        return orphans - freed, freed


def describe_holders(name: str) -> str:
    """Who holds the slots of ``name`` and since when (from the lease storage when it is reachable)."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    if not local_mode():
        return "held by another run (see the Prefect UI → Concurrency)"
    try:
        return run_coro_as_sync(_describe(name)) or "held"
    except Exception as exc:  # describing is best effort; the wait goes on either way
        return f"held (holder unknown: {type(exc).__name__})"


async def _describe(name: str) -> str:
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.server.database import provide_database_interface
    from prefect.server.models.concurrency_limits_v2 import read_concurrency_limit

    db, storage = provide_database_interface(), get_concurrency_lease_storage()
    async with db.session_context() as session:
        limit = await _untyped(read_concurrency_limit)(session, name=name)
    if limit is None:
        return "no such limit"
    if not limit.active_slots:
        return f"0/{limit.limit} slot(s) held: free, the runs ahead in line take it first"
    parts = []
    for lease_id in await storage.read_active_lease_ids(limit=1000):
        lease = await storage.read_lease(lease_id)
        if lease and limit.id in lease.resource_ids and lease.metadata:
            who = f"{lease.metadata.holder.type} {lease.metadata.holder.id}" if lease.metadata.holder else "a run"
            parts.append(f"{who} since {lease.created_at:%Y-%m-%d %H:%M:%S} UTC (lease until {lease.expiration:%H:%M:%S})")
    return f"{limit.active_slots}/{limit.limit} slot(s) held by " + ("; ".join(parts) or "holders without a lease")


PROMOTE_WAIT_SECONDS = float(os.environ.get("LORAOPS_PROMOTE_WAIT_SECONDS", "300"))


@contextlib.contextmanager
def promotion_lock(name: str, who: str, timeout: float | None = None) -> Iterator[None]:
    """One promote/rollback per model at a time; a second one waits its turn.

    On this host an OS file lock (released by the kernel when its holder dies, so never stale); with a
    shared Prefect server (``PREFECT_API_URL`` set, team mode) also a leased slot of the global
    concurrency limit ``promote-<name>``, which serialises promotions across hosts.

    Raises:
        RegistryError: when the lock is not free within ``timeout`` seconds (default 300), naming its holder.
    """
    from filelock import FileLock, Timeout

    timeout = PROMOTE_WAIT_SECONDS if timeout is None else timeout
    path = LOCKS_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_suffix(".holder.json")
    try:
        local = FileLock(str(path), timeout=timeout)
        local.acquire()
    except Timeout:
        raise RegistryError(f"another promote/rollback of {name!r} is in progress ({_holder(holder)}); "
                            f"waited {timeout:g}s, try again when it finishes") from None
    try:
        atomic_write(holder, json.dumps({"pid": os.getpid(), "by": who, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        with _shared_lock(name, timeout):
            yield
    finally:
        holder.unlink(missing_ok=True)
        local.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']}, {info['by']}, since {info['since']}"
    except (OSError, ValueError, KeyError):  # gone or unreadable: the lock itself is what counts
        return "holder unknown"


@contextlib.contextmanager
def _shared_lock(name: str, timeout: float) -> Iterator[None]:
    if local_mode():
        yield
        return
    limit = f"promote-{name}"
    ensure_limit(limit, 1)
    try:
        with slot(limit, timeout_seconds=timeout, lease_duration=120):
            yield
    except TimeoutError:
        raise RegistryError(f"another promote/rollback of {name!r} holds the Prefect limit {limit}; waited {timeout:g}s") from None


GPU_LIMIT = os.environ.get("LORAOPS_GPU_LIMIT", "gpu")
"""The limit training and generation take: ``gpu``, shared by every project of this Prefect database (local mode: the
user's; team mode: the server's), because one GPU runs one training at a time. A project that has a GPU of its own
sets ``LORAOPS_GPU_LIMIT=gpu-<project>`` (README "One GPU, several projects")."""


def host_name() -> str:
    """This host's name in limits and run tags: ``LORAOPS_HOST``, else the machine's hostname."""
    import socket

    return os.environ.get("LORAOPS_HOST") or socket.gethostname()


def host_gpu_limit() -> tuple[str, int]:
    """The limit of a run on a work pool's worker: this host's GPUs only (``gpu-<host>``), with a slot per GPU
    (``LORAOPS_GPU_SLOTS``, else the CUDA device count, at least 1), so two hosts train at once and two runs on one
    host take turns. ``LORAOPS_GPU_LIMIT`` names another."""
    slots = os.environ.get("LORAOPS_GPU_SLOTS")
    if not slots:
        import torch

        slots = str(max(1, torch.cuda.device_count()))
    return os.environ.get("LORAOPS_GPU_LIMIT") or f"gpu-{host_name()}", int(slots)


def run_gpu_limit(on_pool: bool) -> tuple[str, int]:
    """The limit (name, slots) a finetune run's training takes: on a work pool's worker the host's own
    (:func:`host_gpu_limit`), else ``gpu`` (``LORAOPS_GPU_LIMIT``, ``LORAOPS_GPU_SLOTS``)."""
    return host_gpu_limit() if on_pool else (GPU_LIMIT, int(os.environ.get("LORAOPS_GPU_SLOTS", "1")))


def ensure_gpu_limit(slots: int | None = None, name: str | None = None) -> int:
    """Create the Prefect global concurrency limit ``gpu`` (or ``name``) if missing (slots from LORAOPS_GPU_SLOTS,
    default 1)."""
    return ensure_limit(name or GPU_LIMIT, slots or int(os.environ.get("LORAOPS_GPU_SLOTS", "1")))


def gpu_slot(say: Any = print, holder: dict[str, Any] | None = None, name: str | None = None) -> Any:
    """Hold one leased slot of the ``gpu`` limit (or ``name``): training and generation of concurrent runs take turns.

    While waiting it says who holds the slot and since when; in local mode it frees slots of dead holders.
    """
    return waiting_slot(name or GPU_LIMIT, say, holder)
