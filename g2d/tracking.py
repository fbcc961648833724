"""MLflow runs and model registry for g2d: the only module that imports mlflow.

Why one module: every run must carry the same provenance (git commit, DVC stage / experiment,
data hash), every store must be addressed the same way (absolute SQLite URI at the project root
unless ``MLFLOW_TRACKING_URI`` says otherwise), and MLflow's import takes ~1.5 s, which the
CLI should only pay when it tracks something. mlflow is therefore imported inside functions.

Everything goes through an explicit ``MlflowClient`` bound to one URI rather than MLflow's
process-global "active run": two stores can be used in one process (tests, servers), nothing
leaks between runs, and a SIGTERM from DVC or a scheduler can mark exactly this run KILLED.

Registered models use aliases only (MLflow reserves ``latest``; ``NAME/latest`` means the
newest version). A model is g2d's folder of plain files (``model.safetensors``, ``config.yaml``, model
card) logged as an MLflow pyfunc model "from code" (``g2d/mlflow_model.py``) with the folder as its
artifact: loading it unpickles nothing. Versions registered before that are the plain folder alone;
every reader takes both.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from g2d.errors import RegistryError, TrackingError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

__all__ = [
    "ModelRef",
    "ModelVersionInfo",
    "Run",
    "Terminated",
    "check_reachable",
    "describe_version",
    "find_runs",
    "flatten_params",
    "list_models",
    "model_versions",
    "parse_model_ref",
    "project_root",
    "promote",
    "pull_model",
    "redacted",
    "register_model_dir",
    "resolve_model",
    "sqlite_path",
    "start_run",
    "store_root",
    "tracking_uri",
    "version_file",
]

EXPERIMENT_PREFIX = "g2d-"
CONFIG_ARTIFACT = "config.yaml"
RESERVED_ALIAS = "latest"
REF_FORMS = "NAME, NAME@ALIAS, NAME/VERSION or NAME/latest (= NAME@latest; optionally prefixed with models:/)"
SERVER_HINT = (
    "is the server running? start it with `mlflow server --host 127.0.0.1 --port 5000 "
    "--backend-store-uri sqlite:///mlflow.db` or unset MLFLOW_TRACKING_URI to use the local SQLite store"
)

# MLflow's limits (mlflow.utils.validation), copied so that flattening needs no mlflow import.
_MAX_PARAM_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST = 36
_MAX_INPUT_TAG_VALUE = 500
_ALIAS_RE = re.compile(r"^[\w-]+$")
_VERSION_LIKE_ALIAS_RE = re.compile(r"^[vV]\d+$")
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
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


# --------------------------------------------------------------------------- provenance


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _pipeline_outputs(root: Path) -> set[str]:
    """The paths DVC writes (every stage's outs in dvc.lock, metrics committed with `cache: false` included) and
    dvc.lock itself: a `dvc repro` rewrites them as it goes, which is not a change of the code or params."""
    import yaml

    try:
        lock = yaml.load((root / "dvc.lock").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        return {"dvc.lock"} | {o["path"].rstrip("/") for st in lock.get("stages", {}).values()
                               for o in st.get("outs", [])}
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return {"dvc.lock"}


def _git_state(root: Path) -> tuple[str, bool | None]:
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return "unknown", None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if status is None:
        return commit, None
    outputs = _pipeline_outputs(root)
    changed = [line.split(None, 1)[1].split(" -> ")[-1].strip('"') for line in status.splitlines() if line.strip()]
    return commit, any(not any(p == o or p.startswith(o + "/") for o in outputs) for p in changed)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _run_name(job: str) -> str:
    """DVC's names first, so a run is found from `dvc exp show` and vice versa: EXP/STAGE inside an experiment
    (its dozens of runs would otherwise share one name in the runs table), else the stage."""
    names = [os.environ.get(var, "").strip() for var in ("DVC_EXP_NAME", "DVC_STAGE")]
    if any(names):
        return "/".join(n for n in names if n)
    return f"{job}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


# --------------------------------------------------------------------------- params


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy of a config (Paths, enums, numpy scalars become strings/numbers)."""
    return json.loads(json.dumps(obj, default=str))


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple | set):
        text = json.dumps(list(value), default=str)
    elif value is None:
        text = "null"
    else:
        text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _param_key(key: str) -> str:
    key = _BAD_KEY_CHARS.sub("_", key)
    return key[:_MAX_PARAM_KEY]


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` within MLflow's limits, so every leaf of
    params.yaml is a searchable, comparable param (lists as JSON, long values truncated)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, dotted))
        elif isinstance(value, Mapping):
            flat[_param_key(dotted)] = "{}"
        else:
            flat[_param_key(dotted)] = _param_value(value)
    return flat


# --------------------------------------------------------------------------- runs


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a run. A KeyboardInterrupt so that ``except Exception`` in
    training code does not swallow it, and the run is recorded KILLED like a Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum


@dataclass
class Run:
    """A live MLflow run bound to one store; what stages log through."""

    run_id: str
    experiment_name: str
    experiment_id: str
    uri: str
    tags: dict[str, str] = field(default_factory=dict)
    _client: Any = field(default=None, repr=False)

    @property
    def artifact_uri(self) -> str:
        return self._client.get_run(self.run_id).info.artifact_uri

    def set_tag(self, key: str, value: Any) -> None:
        text = str(value)
        self._client.set_tag(self.run_id, key, text[:_MAX_TAG_VALUE])
        self.tags[key] = text

    def log_params_flat(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params, prefix).items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None) -> None:
        """``model_id``: also the metrics of that logged model of the run (see `register_model_dir`)."""
        from mlflow.entities import Metric

        now = int(datetime.now(UTC).timestamp() * 1000)
        items = [Metric(_param_key(k), float(v), now, int(step or 0), model_id=model_id) for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"cannot log artifact {path}: no such file or folder")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """``name`` ending in .yaml/.yml is written as YAML, anything else as JSON."""
        self._client.log_dict(self.run_id, _plain(obj), name)

    def log_text(self, text: str, name: str) -> None:
        self._client.log_text(self.run_id, text, name)

    def log_image(
        self,
        path: str | Path,
        artifact_path: str = "images",
        *,
        key: str | None = None,
        step: int | None = None,
    ) -> None:
        """A PNG as a plain artifact; with ``key`` (and ``step``) also as a time-stepped image
        that the MLflow UI shows as a slider over training steps."""
        path = Path(path)
        if not path.is_file():
            raise TrackingError(f"cannot log image {path}: no such file")
        if key is None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)
            return
        from PIL import Image

        with Image.open(path) as img:
            self._client.log_image(self.run_id, img.copy(), key=key, step=int(step or 0))

    def log_figure(self, figure: Any, artifact_file: str | None = None) -> None:
        """A saved PNG path, or a matplotlib figure written as ``artifact_file``."""
        if isinstance(figure, str | Path):
            if artifact_file is None:
                self.log_image(figure)
            else:
                parent = str(Path(artifact_file).parent)
                self.log_image(figure, "" if parent == "." else parent)
            return
        self._client.log_figure(self.run_id, figure, artifact_file or "figures/figure.png")

    def log_dataset(
        self,
        name: str,
        source: str,
        digest: str,
        context: str,
        schema: Mapping[str, str] | None = None,
        profile: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Record a dataset as an MLflow run *input* identified by our own content hash.

        MLflow caps digests at 36 characters, so a longer hash is shortened in the digest and
        kept whole in the input tag ``g2d.digest``. ``schema`` maps column -> type."""
        from mlflow.entities import DatasetInput, InputTag

        ds = _metadataset(name, source, digest[:_MAX_DATASET_DIGEST], schema, profile)
        input_tags = [InputTag(key="mlflow.data.context", value=context), InputTag("g2d.digest", digest)]
        input_tags += [InputTag(key=k, value=str(v)[:_MAX_INPUT_TAG_VALUE]) for k, v in (tags or {}).items()]
        self._client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=input_tags)]
        )


class Untracked:
    """Stands in for a Run where nothing may be logged: the ranks other than 0 of a distributed run,
    which compute the same steps but must not write a second MLflow run."""

    run_id = ""
    tags: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def untracked() -> Iterator[Untracked]:
    yield Untracked()


def _metadataset(
    name: str,
    source: str,
    digest: str,
    schema: Mapping[str, str] | None,
    profile: Mapping[str, Any] | None,
) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class _Dataset(MetaDataset):
        """MetaDataset that also carries a profile and a plain column -> type schema."""

        @property
        def profile(self) -> Any:
            return dict(profile) if profile else None

        def to_dict(self) -> dict[str, str]:
            out = super().to_dict()
            if schema:
                cols = [{"name": str(c), "type": str(t)} for c, t in schema.items()]
                out["schema"] = json.dumps({"mlflow_colspec": cols})
            if profile:
                out["profile"] = json.dumps(_plain(dict(profile)))
            return out

    with warnings.catch_warnings():  # "can be interpreted in multiple ways" for local paths
        warnings.simplefilter("ignore")
        src = resolve_dataset_source(source)
    return _Dataset(source=src, name=name, digest=digest)


# The MLflow UI opens an experiment by its kind: without this tag a g2d experiment opens on the GenAI
# "Overview" (traces) page; with it, on the training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client: MlflowClient, uri: str, job: str) -> str:
    """One experiment per kind of job, tagged as model training; artifacts of local stores under
    <root>/mlartifacts."""
    name = f"{EXPERIMENT_PREFIX}{job}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older g2d
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if _is_local_store(uri):
        location = (store_root() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception as exc:  # another stage created it between our get and create
        if not _already_exists(exc) and "UNIQUE constraint" not in str(exc):
            raise
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class _SigtermGuard:
    """Turns SIGTERM into ``Terminated`` while a run's body runs, so the run can be closed
    KILLED. While the run is being closed, a SIGTERM is held back (an exception raised inside
    ``set_terminated`` could leave the run RUNNING) and re-delivered once the old handler is back."""

    def __init__(self) -> None:
        self.closing = False
        self.fired = False
        self.pending = False
        self._old: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.fired:  # already stopping: a repeated SIGTERM must not interrupt the closing
            return
        if self.closing:
            self.pending = True
            return
        self.fired = True
        raise Terminated(signum)

    def __enter__(self) -> _SigtermGuard:
        # handlers can only be installed from the main thread; elsewhere SIGTERM keeps its meaning
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._installed:
            return
        signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)
        if self.pending:
            signal.raise_signal(signal.SIGTERM)


@contextlib.contextmanager
def start_run(
    job: str,
    *,
    config: Mapping[str, Any],
    data_hash: str | None = None,
    tags: Mapping[str, Any] | None = None,
    uri: str | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Run]:
    """A tracked run of one job, closed FINISHED / FAILED / KILLED whatever happens in the body
    (never left RUNNING); the body's exception is re-raised.

    ``uri`` is the configured store (params.yaml); ``MLFLOW_TRACKING_URI`` still wins.
    ``system_metrics`` samples CPU / GPU / memory into ``system/*`` metrics every 10 s."""
    if not job or not re.fullmatch(r"[\w.-]+", job):
        raise TrackingError(f"job name {job!r} must be non-empty letters, digits, '_', '-' or '.'")
    store = tracking_uri(uri)
    check_reachable(store)
    root = project_root()
    commit, dirty = _git_state(root)
    run_tags: dict[str, str] = {
        "g2d.job": job,
        "g2d.git_commit": commit,
        # what MLflow's fluent start_run would add, so the UI's User / Source columns are filled
        "mlflow.user": _user(),
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        "mlflow.source.type": "LOCAL",
    }
    if dirty is not None:
        run_tags["g2d.git_dirty"] = "true" if dirty else "false"
    if commit != "unknown":
        run_tags["mlflow.source.git.commit"] = commit
    for tag, var in (("g2d.dvc_stage", "DVC_STAGE"), ("g2d.dvc_exp", "DVC_EXP_NAME")):
        if os.environ.get(var):
            run_tags[tag] = os.environ[var]
    if data_hash:
        run_tags["g2d.data_hash"] = data_hash
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_tags.update({str(k): str(v)[:_MAX_TAG_VALUE] for k, v in (tags or {}).items()})

    client = _client(store)
    try:
        exp_id = _experiment_id(client, store, job)
        info = client.create_run(exp_id, tags=run_tags, run_name=_run_name(job)).info
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"cannot start an MLflow run for job {job!r} in {redacted(store)}: {exc}") from exc

    run = Run(info.run_id, f"{EXPERIMENT_PREFIX}{job}", exp_id, store, dict(run_tags), client)
    monitor = None
    status = "FAILED"
    with _SigtermGuard() as guard:
        try:
            run.log_params_flat(config)
            run.log_dict(config, CONFIG_ARTIFACT)
            if system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(run.run_id, tracking_uri=store)
                monitor.start()
            yield run
            status = "FINISHED"
        except KeyboardInterrupt:  # includes Terminated (SIGTERM)
            status = "KILLED"
            raise
        except SystemExit as exc:
            status = "FINISHED" if exc.code in (0, None) else "FAILED"
            raise
        finally:
            guard.closing = True
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()
            _terminate(client, run.run_id, status)


def close_interrupted(run_id: str, *, uri: str | None = None) -> bool:
    """Mark KILLED a run left RUNNING by a process that died without closing it (kill -9, a lost node):
    what a resumed job does for the run it continues. False when the run is gone or already closed."""
    client = _client(tracking_uri(uri))
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except Exception as exc:
        if _not_found(exc):
            return False
        raise
    _terminate(client, run_id, "KILLED")
    return True


def _terminate(client: MlflowClient, run_id: str, status: str) -> None:
    """Best effort: an unreachable store must not hide the body's own exception."""
    try:
        client.set_terminated(run_id, status=status)
    except Exception as exc:
        warnings.warn(f"could not mark MLflow run {run_id} {status}: {exc}", stacklevel=3)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of ``version`` / ``alias``, or neither = newest."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def is_latest(self) -> bool:
        return self.version is None and self.alias is None

    @property
    def uri(self) -> str:
        if self.alias is not None:
            return f"models:/{self.name}@{self.alias}"
        return f"models:/{self.name}/{self.version if self.version is not None else RESERVED_ALIAS}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class ModelVersionInfo:
    """One resolved registered model version."""

    name: str
    version: int
    run_id: str | None
    source: str
    aliases: tuple[str, ...] = ()


def _bad_ref(ref: str, why: str) -> RegistryError:
    return RegistryError(f"bad model reference {ref!r}: {why}. Accepted forms: {REF_FORMS}")


def _check_name(name: str, ref: str) -> None:
    if not name.strip():
        raise _bad_ref(ref, "the model name is empty")
    if any(c in name for c in "/:@"):
        raise _bad_ref(ref, f"model name {name!r} may not contain '/', ':' or '@'")


def parse_model_ref(ref: str) -> ModelRef:
    """Accept the forms people type (``g2d-encoder@champion``, ``g2d-encoder/3``,
    ``models:/g2d-encoder/latest``) and reject anything else before touching the store."""
    text = (ref or "").strip()
    if text.startswith("models:"):
        if not text.startswith("models:/") or text.startswith("models://"):
            raise _bad_ref(ref, "use models:/NAME... (no host part)")
        text = text[len("models:/") :]
    if "@" in text:
        name, alias = text.split("@", 1)
        _check_name(name, ref)
        if not alias:
            raise _bad_ref(ref, "the alias after '@' is empty")
        if alias.lower() == RESERVED_ALIAS:  # reserved, so never set: it can only mean the newest version
            return ModelRef(name)
        if not _ALIAS_RE.match(alias):
            raise _bad_ref(ref, f"alias {alias!r} may only contain letters, digits, '_' and '-'")
        return ModelRef(name, alias=alias)
    if "/" in text:
        name, rest = text.split("/", 1)
        _check_name(name, ref)
        if rest.lower() == RESERVED_ALIAS:
            return ModelRef(name)
        if rest.isdigit() and int(rest) > 0:
            return ModelRef(name, version=int(rest))
        raise _bad_ref(ref, f"{rest!r} after '/' is neither a version number (1, 2, ...) nor 'latest'")
    _check_name(text, ref)
    return ModelRef(text)


def _check_alias(alias: str) -> None:
    if alias.lower() == RESERVED_ALIAS:
        raise RegistryError(
            f"alias '{alias}' is reserved by MLflow: models:/NAME/latest already means the newest "
            "version; pick another alias (e.g. 'champion', 'candidate')"
        )
    if not _ALIAS_RE.match(alias) or _VERSION_LIKE_ALIAS_RE.match(alias):
        raise RegistryError(
            f"alias {alias!r} is invalid: use letters, digits, '_' and '-', not of the form v<N> "
            "(e.g. 'champion', 'candidate')"
        )


def _versions(client: MlflowClient, name: str) -> list[Any]:
    quote = '"' if "'" in name else "'"
    found = client.search_model_versions(f"name={quote}{name}{quote}")
    return sorted(found, key=lambda mv: int(mv.version))


def _registered_model(client: MlflowClient, name: str, uri: str) -> Any:
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if not _not_found(exc):
            raise TrackingError(f"cannot read registered model {name!r} from {redacted(uri)}: {exc}") from exc
        names = sorted(m.name for m in _all_registered(client))
        known = ", ".join(names) if names else "none yet (train and register a model first)"
        raise RegistryError(f"no registered model {name!r} in {redacted(uri)}; registered models: {known}") from exc


def _all_registered(client: MlflowClient) -> list[Any]:
    models: list[Any] = []
    token = None
    while True:
        page = client.search_registered_models(page_token=token)
        models.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return models


def _describe(aliases: Mapping[str, Any], versions: list[int]) -> str:
    parts = [f"{a}->{v}" for a, v in sorted(aliases.items())]
    if versions:
        parts.append(f"latest->{max(versions)} (newest version, not an alias)")
    return (
        f"aliases: {', '.join(parts) if parts else 'none'}; "
        f"versions: {', '.join(map(str, versions)) if versions else 'none'}"
    )


def resolve_model(ref: str | ModelRef, *, uri: str | None = None) -> ModelVersionInfo:
    """Turn a reference into one concrete version, with an error that lists what exists."""
    mref = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    store = tracking_uri(uri)
    _existing_store(store)
    client = _client(store)
    model = _registered_model(client, mref.name, store)
    versions = _versions(client, mref.name)
    numbers = [int(mv.version) for mv in versions]
    aliases = dict(model.aliases or {})
    what = _describe(aliases, numbers)
    if mref.alias is not None:
        if mref.alias not in aliases:
            raise RegistryError(f"model {mref.name!r} has no alias {mref.alias!r}; {what}")
        number = int(aliases[mref.alias])
    elif mref.version is not None:
        number = mref.version
    elif numbers:
        number = numbers[-1]
    else:
        raise RegistryError(f"model {mref.name!r} has no versions yet; register one first")
    mv = next((v for v in versions if int(v.version) == number), None)
    if mv is None:
        raise RegistryError(f"model {mref.name!r} has no version {number}; {what}")
    own = tuple(sorted(a for a, v in aliases.items() if int(v) == number))
    return ModelVersionInfo(mref.name, number, mv.run_id, mv.source, own)


def register_model_dir(
    run: Run,
    local_dir: Path,
    name: str,
    aliases: Iterable[str] = (),
    *,
    description: str | None = None,
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
) -> int:
    """Log a g2d model folder as an MLflow model of the run (pyfunc, from code: g2d/mlflow_model.py; the
    folder as its artifact, named after the registered model) and register it as a new model version, linked
    to the run as its output at ``step`` (the run's last step: its metrics there become the model's too).
    ``metrics`` (the model's headline scores) are logged to the run at ``step`` linked to the model; log them
    here rather than before, or the run holds them twice.

    The version carries the run's provenance tags so `list_models` / the UI show which commit
    and data made it. Returns the new version number."""
    local_dir = Path(local_dir)
    aliases = list(aliases)
    _check_name(name, name)
    for alias in aliases:
        _check_alias(alias)
    if not local_dir.is_dir() or not any(local_dir.iterdir()):
        raise RegistryError(f"cannot register model {name!r}: {local_dir} is not a folder with files in it")
    client = run._client
    try:
        # MLflow logs the model, and the registry looks the logged model up, through its process-global URI
        with _global_uri(run.uri):
            logged = _log_mlflow_model(run, local_dir, name, step)
            mv = _new_version(client, run, name, logged, description)
        if metrics:
            run.log_metrics(metrics, step=step, model_id=logged.model_id)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, mv.version)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"cannot register {local_dir} as model {name!r} in {run.uri}: {exc}") from exc
    run.set_tag(f"g2d.registered.{name}", str(mv.version))
    return int(mv.version)


def _new_version(client: MlflowClient, run: Run, name: str, logged, description: str | None):
    try:
        client.create_registered_model(name)
    except Exception as exc:
        if not _already_exists(exc):
            raise
    version_tags = {k: v for k, v in run.tags.items() if k.startswith("g2d.")}
    mv = client.create_model_version(name, source=logged.model_uri, run_id=run.run_id, tags=version_tags,
                                     description=description, model_id=logged.model_id)
    # what mlflow.register_model also writes: the logged model's page lists its versions ("Not registered" else)
    client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": json.dumps(
        [{"name": name, "version": str(mv.version)}])})
    return mv


MODEL_FOLDER = "g2d_model"  # the g2d model folder among a registered MLflow model's artifacts
_EXAMPLE_PROMPTS = ["pleural effusion", "no pleural effusion"]


def _log_mlflow_model(run: Run, local_dir: Path, name: str, step: int):
    """The folder as an MLflow pyfunc model of `run` (models from code: no pickle), with a signature, an input
    example (a small PNG) and g2d's dependencies pinned to the versions installed here."""
    import mlflow
    import pandas as pd
    import yaml
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    config = yaml.safe_load((local_dir / "config.yaml").read_text()) if (local_dir / "config.yaml").is_file() else {}
    encoder = config.get("kind", "g2d-encoder") == "g2d-encoder"
    columns = [ColSpec(DataType.binary, "image")] + ([ColSpec(Array(DataType.string), "prompts")] if encoder else [])
    example = pd.DataFrame({"image": [_example_png()], **({"prompts": [_EXAMPLE_PROMPTS]} if encoder else {})})
    with tempfile.TemporaryDirectory(prefix="g2d-log-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on pip / uv environments, not ours to act on
        staged = Path(tmp) / MODEL_FOLDER  # MLflow keeps a folder artifact under its own name: make it ours
        shutil.copytree(local_dir, staged, copy_function=_link_or_copy)
        # in the run's experiment (Model.log alone would file it under the fluent API's current experiment)
        params = run._client.get_run(run.run_id).data.params
        model = run._client.create_logged_model(run.experiment_id, name=name, source_run_id=run.run_id,
                                                params=params, model_type="g2d")
        # the run's output at `step`: MLflow files the run's metrics of that step under the model too, so
        # at the final step (not step 0, where the system metrics' first sample sits) the model shows its scores
        return Model.log(None, name=name, flavor=mlflow.pyfunc, run_id=run.run_id, model_id=model.model_id,
                         step=step,
                         python_model=str(Path(__file__).with_name("mlflow_model.py")),
                         artifacts={MODEL_FOLDER: str(staged)}, signature=ModelSignature(inputs=Schema(columns)),
                         input_example=example, pip_requirements=pinned_requirements())


@contextlib.contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """MLflow logs a model through its process-global tracking URI, which `set_tracking_uri` also writes to
    the MLFLOW_TRACKING_URI variable (and None unsets it): set it for the call, then put both back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _example_png() -> bytes:
    """A 64 x 64 grey gradient as PNG bytes: the input example every registered model is checked with."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) * 2
    Image.fromarray(ramp).save(buf, format="PNG")
    return buf.getvalue()


def pinned_requirements() -> list[str]:
    """g2d's dependencies at the versions installed here (g2d itself is installed from its repository)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    out = []
    for spec in requires("g2d") or []:
        if "extra ==" in spec:
            continue
        name = re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(spec.split(";")[0].strip())
    return out


def model_folder(downloaded: Path) -> Path:
    """Where a downloaded version's g2d files are: the MLflow model's artifact (registered by this g2d) or
    the folder itself (versions registered before g2d logged MLflow models)."""
    for candidate in (downloaded / "artifacts" / MODEL_FOLDER, downloaded / MODEL_FOLDER, downloaded):
        if (candidate / "model.safetensors").is_file():
            return candidate
    return downloaded


def list_models(*, uri: str | None = None) -> list[dict[str, Any]]:
    """Registered models with their versions and aliases, newest-updated first."""
    store = tracking_uri(uri)
    _existing_store(store)
    client = _client(store)
    rows = []
    for model in _all_registered(client):
        numbers = [int(mv.version) for mv in _versions(client, model.name)]
        updated = model.last_updated_timestamp
        when = datetime.fromtimestamp(updated / 1000, UTC).isoformat(timespec="seconds") if updated else ""
        rows.append(
            {
                "name": model.name,
                "latest_version": numbers[-1] if numbers else None,
                "versions": numbers,
                "aliases": {a: int(v) for a, v in sorted((model.aliases or {}).items())},
                "description": model.description or "",
                "last_updated": when,
            }
        )
    rows.sort(key=lambda r: r["last_updated"], reverse=True)
    return rows


def pull_model(ref: str, out: Path, *, uri: str | None = None) -> Path:
    """Download a registered version into ``out``: the MLflow model at ``out/model``; returns the folder of
    g2d's files (``out/model/artifacts/g2d_model``; ``out/model`` itself for versions of plain files).

    Resolution is ours, download is by the version's own source: MLflow 3.17's
    ``download_artifacts("models:/...", registry_uri=...)`` ignores ``registry_uri`` and asks the
    process-global registry, which may be a different store."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise RegistryError(f"{out}: not empty; pull into a new or empty folder so no stale file is mixed in")
    info = resolve_model(ref, uri=uri)
    store = tracking_uri(uri)
    client = _client(store)
    return model_folder(_download(client, store, info, "", Path(out)))


def _download(client: MlflowClient, store: str, info: ModelVersionInfo, name: str, out: Path) -> Path:
    """A registered version's files (``name`` = "") or one of them, by the version's own source."""
    import mlflow.artifacts

    try:
        source = client.get_model_version_download_uri(info.name, str(info.version))
        out.mkdir(parents=True, exist_ok=True)
        if name and info.source.startswith("models:/"):  # an MLflow model: g2d's files are one of its artifacts
            name = f"artifacts/{MODEL_FOLDER}/{name}"
        uri = f"{source.rstrip('/')}/{name}" if name else source
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out), tracking_uri=store))
        if not name and info.source.startswith("models:/") and got.name == "artifacts":
            got = got.rename(out / "model")  # the MLflow model, as `out/model` like the versions before it
        return got
    except Exception as exc:
        what = f"{name} of model" if name else "model"
        raise RegistryError(f"cannot download {what} {info.name!r} version {info.version} ({info.source}) from "
                            f"{redacted(store)} into {out}: {exc}") from exc


def promote(name: str, version: int, alias: str, *, uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (moving it if another version had it)."""
    _check_alias(alias)
    store = tracking_uri(uri)
    _existing_store(store)
    client = _client(store)
    model = _registered_model(client, name, store)
    numbers = [int(mv.version) for mv in _versions(client, name)]
    if int(version) not in numbers:
        raise RegistryError(
            f"cannot set alias {alias!r}: model {name!r} has no version {version}; "
            f"{_describe(dict(model.aliases or {}), numbers)}"
        )
    try:
        client.set_registered_model_alias(name, alias, str(int(version)))
    except Exception as exc:
        raise RegistryError(f"cannot set alias {alias!r} on model {name!r} version {version}: {exc}") from exc


# ---------------------------------------------------------------- promotion: versions, their runs, their cards


def model_versions(name: str, *, uri: str | None = None) -> list[ModelVersionInfo]:
    """Every version of a registered model, oldest first, with its aliases."""
    store = tracking_uri(uri)
    _existing_store(store)
    client = _client(store)
    model = _registered_model(client, name, store)
    aliases = dict(model.aliases or {})
    return [ModelVersionInfo(name, int(mv.version), mv.run_id, mv.source,
                             tuple(sorted(a for a, v in aliases.items() if int(v) == int(mv.version))))
            for mv in _versions(client, name)]


def version_file(info: ModelVersionInfo, name: str, out: Path, *, uri: str | None = None) -> Path:
    """One file of a registered version (e.g. model.safetensors), downloaded into ``out``."""
    store = tracking_uri(uri)
    return _download(_client(store), store, info, name, Path(out))


def find_runs(job: str, tags: Mapping[str, str], *, uri: str | None = None) -> list[dict[str, Any]]:
    """Finished runs of a job (g2d-<job>) whose tags have these values: run_id, start_time, tags, params,
    metrics."""
    store = tracking_uri(uri)
    _existing_store(store)
    client = _client(store)
    exp = client.get_experiment_by_name(f"{EXPERIMENT_PREFIX}{job}")
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs, token = [], None
    while True:
        try:
            page = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses), max_results=1000,
                                      page_token=token)
        except Exception as exc:
            raise TrackingError(f"cannot search the {EXPERIMENT_PREFIX}{job} runs of {redacted(store)}: {exc}") from exc
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            break
    return [{"run_id": r.info.run_id, "start_time": r.info.start_time, "tags": dict(r.data.tags),
             "metrics": dict(r.data.metrics), "params": dict(r.data.params)} for r in runs]


def describe_version(name: str, version: int, description: str, *, uri: str | None = None) -> None:
    """Set a version's description (the model card the MLflow UI shows on the version's page)."""
    store = tracking_uri(uri)
    client = _client(store)
    try:
        client.update_model_version(name, str(int(version)), description=description)
    except Exception as exc:
        raise RegistryError(f"cannot set the description of model {name!r} version {version}: {exc}") from exc
