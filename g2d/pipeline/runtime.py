"""What every training stage needs: seeding, the device and its precision, and checkpoints that are
written atomically and carry every RNG state so a resumed run continues exactly."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2d.errors import G2DError
from g2d.tracking import Terminated


class CheckpointError(G2DError):
    """A checkpoint cannot be read or does not match the run."""


class NonFiniteLoss(G2DError):
    """The loss became NaN or inf: training stops before the weights take it in."""

    def __init__(self, message: str, step: int = 0, rows: list[int] | None = None) -> None:
        super().__init__(message)
        self.step, self.rows = step, rows or []  # the step, and the global batch's train rows where known


class Stopped(Terminated):
    """Training stopped on SIGTERM / SIGINT after writing a checkpoint (a KeyboardInterrupt, so the run closes
    KILLED); its message says where the checkpoint is and how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum)
        self.args = (message,)


class StopRequests:
    """SIGTERM (a scheduler, `docker stop`, `kill`) or SIGINT (Ctrl-C) during training: the first asks the
    loop to stop after the current step, so it can write a checkpoint; a second one stops at once. Handlers
    go in from the main thread only; on exit the previous ones come back and a request the loop did not act
    on is delivered to them (so a signal that arrives after the last step still ends the run KILLED)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.handled = False  # the loop stopped on it; otherwise it is delivered again on exit
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        if self.signum is not None:  # asked twice: don't wait for the step
            raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        if self.signum is not None and not self.handled and exc_type is None:  # came after the loop last looked
            signal.raise_signal(self.signum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(configured: str, dev: torch.device) -> str:
    """'auto' is bf16 on CUDA and on CPUs with bf16 instructions (AVX512-BF16 or AMX: about 1.4x faster
    steps, measured), fp32 on other CPUs (where bf16 is emulated and slower than fp32)."""
    if configured == "auto":
        return "bf16" if dev.type == "cuda" or cpu_has_bf16() else "fp32"
    return configured


@functools.cache
def cpu_has_bf16() -> bool:
    """Asked once per process: `autocast(dev)` resolves 'auto' on every call."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def autocast(dev: torch.device, mode: str = "auto"):
    """Mixed precision for the forward pass: bf16 or fp16 autocast, or nothing for fp32."""
    mode = precision(mode, dev)
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def grad_scaler(dev: torch.device, mode: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose small gradients would underflow); a pass-through otherwise."""
    return torch.amp.GradScaler(dev.type, enabled=precision(mode, dev) == "fp16")


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": repr(random.getstate()), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "gauss": [int(np_state[3]), float(np_state[4])]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["gauss"][0], n["gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file, flush it to disk, then rename: a crash or a full disk never leaves a truncated
    checkpoint, and the previous one stays in place until the new one is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e}); the previous one is "
                              "untouched. Free disk space (or fix the folder's permissions) and resume with "
                              "--resume") from None
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain containers only (weights_only): a checkpoint cannot run code when loaded."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from; run without --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False / allowlisting: never pass it on
        found = re.search(r"WeightsUnpickler error:\s*(Unsupported global: GLOBAL \S+|[^\n]+)", str(e))
        raise CheckpointError(f"{path}: not a readable g2d checkpoint (refused by the weights-only loader: "
                              f"{found.group(1).strip() if found else 'not tensors and plain values'}); it is damaged "
                              "or holds objects other than tensors, e.g. a pickle that would run code, and g2d never "
                              "unpickles those: delete it or run without --resume") from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable g2d checkpoint ({type(e).__name__}: {e}); delete it or "
                              "run without --resume") from None
