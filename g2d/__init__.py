"""g2d: pre-train chest X-ray encoders with G2D and measure what they are worth.

`g2d.predict(image, prompts, model=...)`, `g2d.load_model(...)` and `g2d.explain(...)` are the
inference API (g2d/inference.py); they are imported on first use, so `import g2d` stays light."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("g2d")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_API = ("predict", "load_model", "explain", "Prediction")


def __getattr__(name: str):
    if name in _API:
        from g2d import inference as api

        return getattr(api, name)
    raise AttributeError(f"module 'g2d' has no attribute {name!r}")
