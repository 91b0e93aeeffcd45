"""Checkpoint I/O of the training loop: files that survive a crash of the machine, and no pickle.

A checkpoint is a directory `step-00000040/` under the run's `checkpoints/`:

- `*.safetensors`: tensors (trainable weights, their average, the best weights, the optimizer's state
  tensors, the torch / CUDA RNG states), read back with `safetensors` (never `torch.load`);
- `*.json`: everything else (optimizer `param_groups` and scalar states, python and numpy RNG states, the
  loop state), with a small tagged encoding for tuples, tensors and non-string dict keys;
- `checkpoint.json`, written last: the manifest (format, every file and its size).

Durability: files are written into `step-XXXXXXXX.tmp/`, each fsynced, then the directory; the temporary
directory is renamed into place and its parent fsynced; only then are older checkpoints deleted. A crash at
any point leaves the previous complete checkpoint, and `latest_checkpoint` reads only directories with the
final name whose manifest matches the files on disk (a `.tmp` or truncated directory is never used).

`fault_point(name)` is a test hook: with `REGRESSOR_FAULT_POINT=name:n` in the environment, the process
SIGKILLs itself the n-th time it reaches that point (a no-op, one environment lookup, otherwise).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST_FILE = "checkpoint.json"
OPTIMIZER_NAME = "optimizer"
TMP_SUFFIX = ".tmp"
STALE_SUFFIX = ".stale"
_NAME = re.compile(r"^step-(\d{8,})$")

# --- fault injection (tests) ----------------------------------------------------------------------------
FAULT_ENV = "REGRESSOR_FAULT_POINT"
"""`name:n[,name:n...]`: SIGKILL this process the n-th time it reaches `fault_point(name)`."""
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when `REGRESSOR_FAULT_POINT` asks for it (else nothing)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    targets = {}
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        targets[point] = int(count or 1)
    if name not in targets:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == targets[name]:
        os.kill(os.getpid(), signal.SIGKILL)


# --- durable files --------------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries, i.e. renames, durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def save_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1, default=float))
        f.flush()
        os.fsync(f.fileno())


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# --- nested state <-> (JSON, tensors) -------------------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state (dicts, lists, tuples, scalars, tensors) as a JSON-able tree and a flat dict of
    tensors; a tensor at path `state.3.exp_avg` becomes `{"__tensor__": "state.3.exp_avg"}`. Tuples and
    dicts with non-string keys (an optimizer's parameter ids) are tagged so that they come back as they
    were."""
    tensors: dict[str, torch.Tensor] = {}

    def key(*parts: Any) -> str:
        return ".".join(str(p) for p in parts if p != "")

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors at the same path {path!r}")
            tensors[path] = value.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, key(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, key(path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v, key(path, k)) for k, v in value.items()}
            if not all(isinstance(k, str | int) and not isinstance(k, bool) for k in value):
                raise TypeError(f"dict keys at {path!r} must be str or int")
            return {"__items__": [[k, encode(v, key(path, k))] for k, v in value.items()]}
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path!r} without pickle")

    return encode(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `flatten_state`."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if set(tree) == {"__items__"}:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    return tree


def save_state(directory: Path, name: str, state: Any) -> None:
    """`state` as `name.safetensors` (its tensors) + `name.json` (the rest), both fsynced."""
    tree, tensors = flatten_state(state)
    save_tensors(directory / f"{name}.safetensors", tensors)
    save_json(directory / f"{name}.json", {"format": FORMAT_VERSION, "state": tree})


def load_state(directory: Path, name: str) -> Any:
    tensors = load_tensors(directory / f"{name}.safetensors")
    return unflatten_state(load_json(directory / f"{name}.json")["state"], tensors)


def save_optimizer(directory: Path, state_dict: dict[str, Any]) -> None:
    """An optimizer's `state_dict()`: tensors `state.{param_id}.{name}` in `optimizer.safetensors`,
    `param_groups` and scalar states in `optimizer.json`."""
    save_state(directory, OPTIMIZER_NAME, state_dict)


def load_optimizer(directory: Path) -> dict[str, Any]:
    return load_state(directory, OPTIMIZER_NAME)


# --- RNG states -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA) RNG states, in types `flatten_state` stores exactly."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np.asarray(np_state["state"]["key"]).tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": nps["bit_generator"],
            "state": {"key": np.asarray(nps["key"], dtype=np.uint32), "pos": nps["pos"]},
            "has_gauss": nps["has_gauss"],
            "gauss": nps["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    save_state(directory, f"rng_{rank}", rng_state())


def load_rng(directory: Path, rank: int) -> None:
    set_rng_state(load_state(directory, f"rng_{rank}"))


# --- checkpoint directories -----------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """A fresh, empty temporary directory for the checkpoint of `step` (a leftover one is removed)."""
    tmp = root / f"{checkpoint_name(step)}{TMP_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path) -> Path:
    """Make the checkpoint in `tmp` durable and current, then delete the others:

    1. write the manifest (every file and its size), fsync every file, then the directory;
    2. rename `step-N.tmp` to `step-N` (an existing `step-N`, never a complete one of this run, is
       first renamed aside), fsync the parent: the new checkpoint is now durable;
    3. delete every other `step-*` entry (older checkpoints, leftovers), fsync the parent again.
    """
    root = tmp.parent
    final = root / tmp.name.removesuffix(TMP_SUFFIX)
    files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {"format": FORMAT_VERSION, "files": {p.name: p.stat().st_size for p in files}}
    save_json(tmp / MANIFEST_FILE, manifest)
    for path in files:  # each writer fsynced its own; again here, whoever (whichever rank) wrote it
        fsync_path(path)
    fsync_path(tmp)
    if final.exists():
        stale = root / f"{final.name}{STALE_SUFFIX}"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    fault_point("checkpoint_rename")
    fsync_path(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    fsync_path(root)
    return final


def is_complete(directory: Path) -> bool:
    """True when `directory` has a manifest and every file it lists, at its size."""
    try:
        manifest = load_json(directory / MANIFEST_FILE)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def latest_checkpoint(root: Path, required: tuple[str, ...] = ()) -> Path | None:
    """The newest complete checkpoint under `root`: a directory named `step-N` (temporary and stale ones
    have other names) whose manifest matches its files and lists the `required` ones; None when there is
    none."""
    if not root.is_dir():
        return None
    candidates = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    for _, path in sorted(candidates, reverse=True):
        if is_complete(path) and all((path / name).is_file() for name in required):
            return path
    return None
