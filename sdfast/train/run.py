"""A run's files: which it may write, saving them atomically, and resuming from a saved state.

Layout of `output_dir` (one run per folder):

    NAME.safetensors                 the final model (methods that write several files per save
                                     add a suffix: NAME_learned_embeds.safetensors)
    NAME-step00000100.safetensors    intermediate models (--save-every-n-steps)
    state-00000100/                  training state at each save: accelerate's save_state
                                     (trained weights, optimizer, GradScaler, RNG) + the lr
                                     scheduler + sdfast_state.json (run id, step, loss log,
                                     the settings a resume must repeat)
    loss.csv, loss.png               the loss log

Every file and state a run writes carries its run id (safetensors metadata
`sdfast.train.run_id`, `sdfast_state.json`). A run never replaces a model or state that does not
carry its id, and checks every name it will write before it trains. `--resume` continues the
run of the state it is given (same id, so it may replace that run's files); loss.csv and
loss.png are rewritten from the state's loss log.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from ..errors import SdfastError
from ..io.save import check_folder, make_folder
from .losslog import CSV_NAME, PNG_NAME

RUN_ID_KEY = "sdfast.train.run_id"
STATE_FILE = "sdfast_state.json"
STATE_PREFIX = "state-"


def checkpoint_name(output_name, step=None, suffix=""):
    """`NAME<suffix>.safetensors`, or `NAME-step00000100<suffix>.safetensors` for an
    intermediate save."""
    if step is None:
        return f"{output_name}{suffix}.safetensors"
    return f"{output_name}-step{step:08d}{suffix}.safetensors"


def state_name(step):
    """`state-00000100`: the folder of the training state saved after `step`."""
    return f"{STATE_PREFIX}{step:08d}"


def file_owner(path):
    """The run id recorded in a safetensors file, or None."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), "pt") as handle:
            return (handle.metadata() or {}).get(RUN_ID_KEY)
    except Exception:          # not a safetensors file: nobody we know
        return None


def read_state_info(folder):
    """The `sdfast_state.json` of a state folder as a dict, or None (also when unreadable: for
    ownership checks, where an unreadable state is nobody's)."""
    try:
        return json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def reason(exc):
    """One line about an exception: its type and the first line of its message, shortened."""
    if str(exc).startswith("Weights only load failed"):     # torch's page-long message
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1]
        detail = " ".join(detail.split("Check the documentation")[0].split())[:120]
        return f"not a file torch.save wrote, or damaged: {detail}"
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resume_info(folder):
    """The `sdfast_state.json` of a state folder to resume, checked; SdfastError naming the
    file when it cannot be read or lacks what a resume needs."""
    path = Path(folder) / STATE_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SdfastError(f"{path}: unreadable training state ({reason(exc)})") from None
    info = info if isinstance(info, dict) else {}
    rows = info.get("losses")
    problems = [
        ("run_id", isinstance(info.get("run_id"), str) and info.get("run_id")),
        ("step", isinstance(info.get("step"), int) and not isinstance(info.get("step"), bool)
         and info.get("step") >= 0),
        ("settings", isinstance(info.get("settings"), dict)),
        ("losses", isinstance(rows, list) and all(
            isinstance(r, list) and len(r) == 3 and all(map(_number, r)) for r in rows)),
        ("started_at", _number(info.get("started_at", 0.0))),
    ]
    bad = [key for key, ok in problems if not ok]
    if bad:
        raise SdfastError(f"{path}: corrupt training state (missing or invalid: "
                          f"{', '.join(bad)})")
    return info


def find_state(path):
    """A state folder itself, or the latest `state-*` in an output folder (one with a
    `sdfast_state.json`, readable or not: `resume_info` then says what is wrong with it, so a
    damaged latest state is an error, not skipped for an older one)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if path.is_dir():
        states = sorted(p for p in path.glob(f"{STATE_PREFIX}*")
                        if p.is_dir() and (p / STATE_FILE).exists())
        if states:
            return states[-1]
    raise SdfastError(f"{path}: no training state to resume (expected a {STATE_PREFIX}XXXXXXXX "
                      f"folder with {STATE_FILE}, or an output folder holding one)")


class TrainRun:
    """Names, ownership checks, saves and resume of one training run (see module docstring).

    `settings`: the JSON-able options a resume must repeat exactly (the loss curve depends on
    them); `save_every`: intermediate save period (None: only the final save); `suffixes`: the
    files of one save (`checkpoint_name` suffixes, the first is the main file).
    """

    def __init__(self, accelerator, output_dir, output_name, settings, max_steps,
                 save_every=None, resume=None, suffixes=("",)):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.settings = settings
        self.max_steps = max_steps
        self.save_every = save_every
        self.suffixes = tuple(suffixes)
        self.state_dir = None
        self.start_step, self.loss_rows, self.run_id = 0, [], uuid.uuid4().hex
        self.started_at = time.time()
        if resume is not None:
            self._read_resume(resume)
        self.check_outputs()
        if accelerator.is_main_process:
            make_folder(self.output_dir, "output_dir")
        accelerator.wait_for_everyone()

    def _read_resume(self, resume):
        self.state_dir = find_state(resume)
        info = resume_info(self.state_dir)
        changed = sorted(k for k in set(info["settings"]) | set(self.settings)
                         if info["settings"].get(k) != self.settings.get(k))
        if changed:
            diffs = "; ".join(f"{k} was {info['settings'].get(k)!r}, now {self.settings.get(k)!r}"
                              for k in changed)
            raise SdfastError(f"{self.state_dir}: cannot resume with different settings: {diffs}")
        self.run_id, self.start_step = info["run_id"], int(info["step"])
        self.started_at = info.get("started_at", self.started_at)
        self.loss_rows = [tuple(r) for r in info["losses"]]
        if self.start_step >= self.max_steps:
            raise SdfastError(f"{self.state_dir}: the state is at step {self.start_step}; "
                              f"max_train_steps ({self.max_steps}) must be larger to continue")

    # ------------------------------------------------------------------ names and ownership
    def save_steps(self):
        """Steps after which this run saves (intermediate saves and the last step)."""
        steps = set()
        if self.save_every:
            steps.update(range(self.save_every, self.max_steps, self.save_every))
        steps.add(self.max_steps)
        return sorted(s for s in steps if s > self.start_step)

    def model_paths(self, step):
        """The files of the save after `step`, one per suffix (final names at the last step)."""
        at = None if step == self.max_steps else step
        return [self.output_dir / checkpoint_name(self.output_name, at, suffix)
                for suffix in self.suffixes]

    def model_path(self, step):
        """The main file saved after `step`."""
        return self.model_paths(step)[0]

    def check_outputs(self):
        """Refuse up front any name this run would write that another run owns, and an
        output folder that cannot be one."""
        check_folder(self.output_dir, "output_dir")
        for step in self.save_steps():
            for path in self.model_paths(step):
                if path.exists() and file_owner(path) != self.run_id:
                    raise SdfastError(f"{path}: exists and was not written by this run (refusing "
                                      "to overwrite it; use another output name or folder)")
            state = self.output_dir / state_name(step)
            if state.exists() and (read_state_info(state) or {}).get("run_id") != self.run_id:
                raise SdfastError(f"{state}: exists and was not written by this run "
                                  "(refusing to overwrite it)")
        if self.state_dir is None:
            for name in (CSV_NAME, PNG_NAME):
                if (self.output_dir / name).exists():
                    raise SdfastError(f"{self.output_dir / name}: exists (another run's log; "
                                      "pass --resume to continue that run, or use a new folder)")

    # ------------------------------------------------------------------ saving
    def save_model(self, step, *writers):
        """`writers[i](path, overwrite)` writes the file of suffix i, on the main process;
        returns the main path."""
        paths = self.model_paths(step)
        if len(writers) != len(paths):
            raise ValueError(f"{len(paths)} files per save but {len(writers)} writers")
        if self.accelerator.is_main_process:
            for path, write in zip(paths, writers):
                owned = path.exists()
                if owned and file_owner(path) != self.run_id:
                    raise SdfastError(f"{path}: exists and was not written by this run")
                write(path, owned)
        self.accelerator.wait_for_everyone()
        return paths[0]

    def save_state(self, step, loss_rows):
        """accelerate's save_state into a temporary folder, then renamed into place."""
        acc = self.accelerator
        final = self.output_dir / state_name(step)
        tmp = self.output_dir / f".{final.name}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(os.fspath(tmp))
        if acc.is_main_process:
            info = {"run_id": self.run_id, "step": step, "settings": self.settings,
                    "started_at": self.started_at, "losses": [list(r) for r in loss_rows]}
            (tmp / STATE_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
            _replace_folder(tmp, final, self.run_id)
        acc.wait_for_everyone()
        return final

    def load_state(self):
        """Restore weights, optimizer, registered objects and random states from the resume
        state; a file that cannot be read is an SdfastError naming it (accelerate would skip
        unreadable random states, and the loss curve would not repeat)."""
        acc, folder = self.accelerator, self.state_dir
        restore_random_states(folder / f"random_states_{acc.process_index}.pkl")
        try:
            acc.load_state(os.fspath(folder))
        except SdfastError:
            raise
        except Exception as exc:
            path, error = damaged_state_file(folder)
            if path is not None:
                raise SdfastError(f"{path}: unreadable training state file ({reason(error)})"
                                  ) from None
            raise SdfastError(f"{folder}: cannot load the training state ({reason(exc)})"
                              ) from None


def restore_random_states(path):
    """Set Python's, NumPy's and torch's random states (CUDA's when saved and present) from
    accelerate's `random_states_N.pkl`; SdfastError naming the file when it cannot."""
    import random

    import numpy as np
    import torch
    from accelerate.utils import load

    try:
        states = load(path)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as exc:
        raise SdfastError(f"{path}: unreadable training state file ({reason(exc)})") from None


def damaged_state_file(folder):
    """`(path, exception)` of the first file of a state folder that accelerate's loader cannot
    read (in the order it reads them), or `(None, None)`."""
    from accelerate.utils import load

    files = sorted((p for p in Path(folder).iterdir()
                    if p.is_file() and p.suffix in (".bin", ".pt", ".pkl")),
                   key=lambda p: (p.name.startswith("custom_checkpoint_"), p.name))
    for path in files:
        try:            # accelerate reads its own registered objects' states unrestricted
            load(path, map_location="cpu",
                 weights_only=not path.name.startswith("custom_checkpoint_"))
        except Exception as exc:
            return path, exc
    return None, None


def _replace_folder(tmp, final, run_id):
    if final.exists():
        if (read_state_info(final) or {}).get("run_id") != run_id:
            raise SdfastError(f"{final}: exists and was not written by this run")
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


__all__ = ["RUN_ID_KEY", "STATE_FILE", "TrainRun", "checkpoint_name", "state_name",
           "file_owner", "find_state", "read_state_info", "resume_info", "check_folder",
           "make_folder"]
