"""Typed errors. Library code raises these with a message that names the file, row or key
and says what would fix it; only the CLI turns them into one line and an exit code."""


class G2DError(Exception):
    """Base of every error g2d raises on purpose."""


class ConfigError(G2DError):
    """params.yaml or a --set override is invalid."""


class DataError(G2DError):
    """A source file or dataset on disk is missing, corrupt or inconsistent."""


class ManifestError(DataError):
    """A manifest does not follow the schema or points at bad files."""


class TrackingError(G2DError):
    """The MLflow tracking store cannot be reached or used."""


class RegistryError(TrackingError):
    """A registered model, version or alias does not exist."""
