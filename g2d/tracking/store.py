"""The MLflow store g2d tracks to: where it is (a SQLite file at the project root unless ``MLFLOW_TRACKING_URI``
or params say otherwise), whether it can be reached, and the client every call goes through.

Parallel DVC experiments write to one SQLite store: its lock is waited out here (`_retry_locked`), and a new
store is created by one process at a time (`_store_creation_lock`). Nothing here knows runs or models.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from g2d.errors import RegistryError, TrackingError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

SERVER_HINT = (
    "is the server running? start it with `mlflow server --host 127.0.0.1 --port 5000 "
    "--backend-store-uri sqlite:///mlflow.db` or unset MLFLOW_TRACKING_URI to use the local SQLite store"
)
_PROBE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- locations


def project_root(start: Path | None = None) -> Path:
    """The project a command reads and writes (data, models, metrics): the nearest folder above the cwd that
    holds dvc.yaml or .git. Under `dvc exp run --queue` / `--temp` that is DVC's temporary copy of the
    workspace, whose outputs DVC collects into the experiment."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    env = os.environ.get("DVC_ROOT")
    return Path(env).resolve() if env else here


def store_root() -> Path:
    """Where the default MLflow store and its artifacts live: DVC_ROOT, which DVC points at the user's project
    even for an experiment running in a temporary copy, so every stage and experiment shares one store; else
    the project root."""
    env = os.environ.get("DVC_ROOT")
    return Path(env).resolve() if env else project_root()


def tracking_uri(configured: str | None = None) -> str:
    """The store to use: ``MLFLOW_TRACKING_URI`` (the user's switch to a server) beats
    ``configured`` (params.yaml), which beats the project's own SQLite file.

    A relative ``sqlite:///x.db`` from params is anchored at the store root, because MLflow
    would anchor it at the cwd and DVC stages may run elsewhere."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if configured and configured.strip():
        uri = configured.strip()
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
            return f"sqlite:///{(store_root() / uri[len('sqlite:///') :]).as_posix()}"
        return uri
    return f"sqlite:///{(store_root() / 'mlflow.db').as_posix()}"


def _is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _is_local_store(uri: str) -> bool:
    """Stores whose artifacts MLflow would put under the cwd unless told otherwise."""
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme not in ("http", "https", "databricks", "databricks-uc", "uc")


def sqlite_path(uri: str) -> Path | None:
    """The file of a local SQLite store URI; None for a server or an in-memory store."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the store is not there."""
    if _is_http(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as resp:
                resp.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TrackingError(
                    f"MLflow tracking server at {uri} answered {exc.code} on /health; {SERVER_HINT}"
                ) from exc
            # any other HTTP answer means something is listening; MLflow's own calls will say more
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); {SERVER_HINT}"
            ) from exc
        return
    address = _database_address(uri)
    if address is not None:
        try:
            socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise TrackingError(
                f"cannot reach the database of MLflow tracking URI {redacted(uri)} at {address[0]}:{address[1]} "
                f"({exc}); is the database server running and the URI's host and port right?"
            ) from exc
        return
    path = sqlite_path(uri)
    if path is not None and not path.parent.is_dir():
        raise TrackingError(
            f"MLflow tracking URI {uri}: folder {path.parent} does not exist; create it, fix the URI, "
            "or unset MLFLOW_TRACKING_URI to use <project root>/mlflow.db"
        )


# default ports of the database servers MLflow's SQLAlchemy store speaks to (dialect[+driver]://)
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _database_address(uri: str) -> tuple[str, int] | None:
    """host and port of a database-server store; None for other stores and for Unix-socket URIs."""
    parsed = urllib.parse.urlparse(uri)
    default = _DATABASE_PORTS.get(parsed.scheme.split("+", 1)[0])
    if default is None or not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or default


def redacted(uri: str) -> str:
    """The URI without its password, for messages."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.password is None:
        return uri
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urllib.parse.urlunparse(parsed._replace(netloc=netloc))


def _client(uri: str) -> MlflowClient:
    """The client every g2d call goes through: its calls are retried while a SQLite store is locked
    (`_RetryingClient`), and a new store is created by one process at a time (`_store_creation_lock`)."""
    import logging

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating initial MLflow database tables" chatter
    registry = os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or uri
    try:
        with _store_creation_lock(uri):  # MlflowClient creates and migrates the store's tables
            client = _retry_locked(lambda: MlflowClient(tracking_uri=uri, registry_uri=registry), uri, "open")
    except MlflowException as exc:
        raise TrackingError(f"MLflow cannot use the tracking URI {redacted(uri)} ({exc.message}); use an "
                            "http(s):// server, a database URI (sqlite:///, postgresql://) MLflow can open, or unset "
                            "MLFLOW_TRACKING_URI") from None
    return _RetryingClient(client, uri)  # type: ignore[return-value]  # an MlflowClient in all but name


# --------------------------------------------------------------------------- concurrent writers
#
# Parallel DVC experiments (`dvc exp run --run-all -j 2`) write to one SQLite mlflow.db. SQLite lets one
# writer in at a time: MLflow makes each statement wait up to 20 s for the lock (`PRAGMA busy_timeout =
# 20000`, set by MLflow on every session, so no engine option or `?timeout=` in the URI can raise it),
# then fails the call with "database is locked". Such a call has written nothing (MLflow rolls its
# transaction back), so g2d repeats it, with backoff, for up to _LOCKED_RETRY_S more.

_LOCKED_MESSAGES = ("database is locked", "database table is locked")
_LOCKED_RETRY_S = 60.0  # on top of MLflow's own 20 s wait per statement
_T = TypeVar("_T")


def _is_locked(exc: BaseException | None) -> bool:
    """Whether a (wrapped: MlflowException, sqlalchemy OperationalError) error is SQLite's lock timeout."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(m in str(exc) for m in _LOCKED_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _locked_error(uri: str, what: str, waited: float) -> TrackingError:
    store = sqlite_path(uri) or uri
    return TrackingError(
        f"MLflow store {store} stayed locked by another process for {waited:.0f} s ({what}); let the other "
        "writer finish (a parallel experiment, `mlflow gc`, a database browser) and rerun, run fewer "
        "experiments at once (`dvc exp run --run-all -j 1`), or serve the store with `mlflow server "
        "--host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db` and set MLFLOW_TRACKING_URI to it"
    )


def _retry_locked(call: Callable[[], _T], uri: str, what: str) -> _T:
    """``call()``, repeated with backoff while the store is locked; then a TrackingError naming the store."""
    started = time.monotonic()
    delay = 0.05
    while True:
        try:
            return call()
        except Exception as exc:
            waited = time.monotonic() - started
            if not _is_locked(exc):
                raise
            if waited + delay > _LOCKED_RETRY_S:
                raise _locked_error(uri, what, waited) from exc
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: two waiting writers do not retry in step
            delay = min(delay * 2, 2.0)


class _RetryingClient:
    """An MlflowClient whose every call is repeated while the store is locked (see above)."""

    def __init__(self, client: MlflowClient, uri: str) -> None:
        self._inner = client
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_inner" not in self.__dict__:  # copy / pickle probing a bare instance
            raise AttributeError(name)
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return _retry_locked(lambda: attr(*args, **kwargs), self._uri, f"MlflowClient.{name}")

        return call


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Hold ``<db>-lock`` while MLflow opens a SQLite store: two processes creating the same new store
    both run MLflow's migrations and leave it half-migrated for good ("table _alembic_tmp_metrics
    already exists" on every later run). A separate file, because SQLite's own locks on the database
    file are dropped when any other handle on it is closed. No-op where flock does not exist."""
    path = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None or not path.parent.is_dir():
        yield
        return
    lock = path.with_name(path.name + "-lock")
    started = time.monotonic()
    try:
        fh = open(lock, "a")
    except OSError:  # a read-only folder: no process can create a store there either
        yield
        return
    with fh:
        locked = True
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > _LOCKED_RETRY_S:
                    raise _locked_error(uri, f"waiting for {lock.name}, held while a process creates the store",
                                        waited) from None
                time.sleep(0.1)
            except OSError:  # a file system without locks (some NFS mounts): go on as before the lock existed
                locked = False
                break
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _existing_store(uri: str) -> str:
    """Read-only commands must not create an empty store where none was meant to be."""
    check_reachable(uri)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise RegistryError(f"no MLflow store at {path} yet (nothing was tracked here); run a stage first, "
                            "or point MLFLOW_TRACKING_URI at your store")
    return uri


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _already_exists(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_ALREADY_EXISTS"
