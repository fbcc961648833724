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


class ImageError(DataError):
    """An image file that cannot be used. The message names the file; `check`, `problem` and `fix` say the
    same without the file or per-file numbers, so a validation report can group many files by cause."""

    def __init__(self, path, problem: str, fix: str, detail: str = "", check: str = "undecodable image",
                 noun: str = "image") -> None:
        self.path, self.problem, self.fix, self.detail, self.check, self.noun = path, problem, fix, detail, check, noun
        super().__init__(f"{noun} {path} {problem}{f' ({detail})' if detail else ''}; {fix}")

    def __reduce__(self):  # picklable across worker processes, whose results carry it
        return type(self), (self.path, self.problem, self.fix, self.detail, self.check, self.noun)
