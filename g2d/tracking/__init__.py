"""MLflow for g2d: runs and the model registry, the only package that imports mlflow (besides
g2d/mlflow_model.py, which MLflow itself runs).

Three modules, one concern each:
- store.py: which store (an absolute SQLite URI at the project root unless ``MLFLOW_TRACKING_URI`` says
  otherwise), whether it can be reached, and the client every call goes through, which waits out a locked
  SQLite store and creates a new store one process at a time;
- runs.py: a tracked run of a job, with the same provenance on every run (git commit, DVC stage /
  experiment, data hash), its params, datasets and artifacts, closed KILLED on a stop signal; runs found
  again by their tags;
- registry.py: model references, versions and aliases, registering a model folder, pulling it back.

Why one package: every run must carry the same provenance, every store must be addressed the same way,
and MLflow's import takes ~1.5 s, which the CLI should only pay when it tracks something; mlflow is
therefore imported inside functions. Everything goes through an explicit ``MlflowClient`` bound to one
URI rather than MLflow's process-global "active run": two stores can be used in one process (tests,
servers), nothing leaks between runs, and a SIGTERM from DVC or a scheduler can mark exactly this run
KILLED.

The names below are the API; callers import the package (`from g2d import tracking`), not its modules.
"""

from g2d.tracking.registry import (
    ModelRef,
    ModelVersionInfo,
    describe_version,
    list_models,
    model_folder,
    model_versions,
    parse_model_ref,
    promote,
    pull_model,
    register_model_dir,
    resolve_model,
    version_file,
)
from g2d.tracking.runs import (
    Run,
    Terminated,
    close_interrupted,
    find_runs,
    flatten_params,
    start_run,
    untracked,
)
from g2d.tracking.store import (
    check_reachable,
    project_root,
    redacted,
    sqlite_path,
    store_root,
    tracking_uri,
)

__all__ = [
    "ModelRef",
    "ModelVersionInfo",
    "Run",
    "Terminated",
    "check_reachable",
    "close_interrupted",
    "describe_version",
    "find_runs",
    "flatten_params",
    "list_models",
    "model_folder",
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
    "untracked",
    "version_file",
]
