"""The MLflow model registry of g2d: references (NAME, NAME@ALIAS, NAME/VERSION, NAME/latest), versions and
their aliases, registering a run's model folder, pulling a version's files back.

Registered models use aliases only (MLflow reserves ``latest``; ``NAME/latest`` means the newest version). A
model is g2d's folder of plain files (``model.safetensors``, ``config.yaml``, model card) logged as an MLflow
pyfunc model "from code" (``g2d/mlflow_model.py``) with the folder as its artifact: loading it unpickles
nothing. Versions registered before that are the plain folder alone; every reader takes both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from g2d.errors import RegistryError, TrackingError
from g2d.tracking.runs import Run, pinned_requirements
from g2d.tracking.store import (
    _already_exists,
    _client,
    _existing_store,
    _not_found,
    redacted,
    tracking_uri,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

RESERVED_ALIAS = "latest"
REF_FORMS = "NAME, NAME@ALIAS, NAME/VERSION or NAME/latest (= NAME@latest; optionally prefixed with models:/)"
_ALIAS_RE = re.compile(r"^[\w-]+$")
_VERSION_LIKE_ALIAS_RE = re.compile(r"^[vV]\d+$")


# --------------------------------------------------------------------------- references


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
                         python_model=str(Path(__file__).parents[1] / "mlflow_model.py"),
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


# ---------------------------------------------------------------- promotion: versions and their cards


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


def describe_version(name: str, version: int, description: str, *, uri: str | None = None) -> None:
    """Set a version's description (the model card the MLflow UI shows on the version's page)."""
    store = tracking_uri(uri)
    client = _client(store)
    try:
        client.update_model_version(name, str(int(version)), description=description)
    except Exception as exc:
        raise RegistryError(f"cannot set the description of model {name!r} version {version}: {exc}") from exc
