"""MLflow runs of g2d's jobs: one experiment per kind of job (g2d-<job>), every run with the same provenance
(git commit and whether the tree is dirty, DVC stage / experiment, data hash), params flattened within MLflow's
limits, datasets as run inputs under g2d's own hashes, and always closed FINISHED / FAILED / KILLED, a SIGTERM
from DVC or a scheduler included. `find_runs` reads finished runs back by their tags.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from g2d.errors import TrackingError
from g2d.tracking.store import (
    _already_exists,
    _client,
    _existing_store,
    _is_local_store,
    _not_found,
    check_reachable,
    project_root,
    redacted,
    store_root,
    tracking_uri,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

EXPERIMENT_PREFIX = "g2d-"
CONFIG_ARTIFACT = "config.yaml"

# MLflow's limits (mlflow.utils.validation), copied so that flattening needs no mlflow import.
_MAX_PARAM_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_DATASET_DIGEST = 36
_MAX_INPUT_TAG_VALUE = 500
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


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


def _machine() -> dict[str, str]:
    """Where a run computed: the same code and seed give other weights on another CPU or another build of
    torch (measured: two machines' pre-trainings of one commit ended 3.0x and 6.1x chance in pointing), so a
    run records both to tell a rerun's drift from a change."""
    import platform

    info: dict[str, str] = {}
    try:  # Linux; the first core's lines
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    have = set(info.get("flags", "").split())
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have)
    return {"g2d.machine": f"{cpu}; {os.cpu_count()} cpus" + (f"; {flags}" if flags else ""),
            "g2d.packages": " ".join(pinned_requirements())}


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
    run_tags.update(_machine())
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


# ---------------------------------------------------------------- runs found again (promotion)


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
