"""Model updates: the repository-update planner (pure) and the poller that applies its plans through Admin.

The planner, plan_update(), maps the old and new state of one model's folder (fingerprints, the version policy of
its config.pbtxt, versions already refused, this round's validation results, what Triton serves) to actions:
load the model (with the repository's config, or the served config pinned to the valid versions), keep serving,
or refuse a version with its reason. A refused version never replaces the one served before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Union

from google.protobuf import json_format
from google.protobuf.text_format import ParseError
from tritonclient.grpc import model_config_pb2 as pb

from fundus_hemorrhage.model_config import ModelConfig, read_config
from .admin import Admin
from .validation import validate_version

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- repository state

@dataclass(frozen=True)
class Fingerprint:
    """What a reload depends on: config.pbtxt's (size, mtime) and, per version folder, each file's."""
    config: tuple
    versions: dict = field(hash=False)  # version -> ((relative path, size, mtime_ns), ...)


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return ()


def fingerprint(model_dir: Path) -> Fingerprint:
    """The model folder's fingerprint; __pycache__ (Python's own writes) is left out."""
    versions = {}
    for entry in sorted(model_dir.iterdir()) if model_dir.is_dir() else []:
        if entry.is_dir() and entry.name.isdigit():
            files = []
            for root, dirs, names in os.walk(entry):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(names):
                    path = Path(root) / name
                    files.append((str(path.relative_to(entry)), *_stat(path)))
            versions[int(entry.name)] = tuple(files)
    return Fingerprint(_stat(model_dir / "config.pbtxt"), versions)


def version_policy(model_dir: Path) -> pb.ModelVersionPolicy:
    """The version_policy of the model's config.pbtxt (Triton's default, latest 1, when it has none or cannot
    be read)."""
    try:
        return read_config(model_dir).version_policy
    except (OSError, ParseError):
        return pb.ModelVersionPolicy()


def select_versions(policy: pb.ModelVersionPolicy, versions) -> list[int]:
    """The versions Triton serves under `policy` among `versions`, ascending."""
    ordered = sorted(versions)
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return ordered
    if kind == "specific":
        return [v for v in ordered if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if kind == "latest" else 1
    return ordered[-n:] if n > 0 else []


# ---------------------------------------------------------------------------------------------------- planner

@dataclass(frozen=True)
class Load:
    """Ask Triton to load `model`: with the repository's config.pbtxt (config None), or with `config` (Triton's
    JSON form), pinned to `versions`."""
    model: str
    versions: tuple[int, ...]
    config: dict | None = None
    note: str = ""


@dataclass(frozen=True)
class Keep:
    """Leave Triton as it is: `model` keeps serving what it serves; `reason` says why."""
    model: str
    reason: str


@dataclass(frozen=True)
class Refuse:
    """Never load `version` of `model` while its files stay as they are."""
    model: str
    version: int
    reason: str


Action = Union[Load, Keep, Refuse]


def versions_to_validate(old: Fingerprint | None, new: Fingerprint, refused: Mapping[int, tuple]) -> list[int]:
    """Versions whose files are new or changed since `old`, except those refused before with the same files
    (`refused`: version -> the files it was refused with)."""
    return [v for v, files in sorted(new.versions.items())
            if refused.get(v) != files and (old is None or old.versions.get(v) != files)]


def plan_update(model: str, old: Fingerprint | None, new: Fingerprint, policy: pb.ModelVersionPolicy,
                serving: list[int], served_config: dict | None, refused: Mapping[int, str],
                validation: Mapping[int, str | None]) -> list[Action]:
    """The actions that bring Triton from serving `serving` (READY versions; `served_config`: its config, None if
    not loaded) to the repository's new state `new` (was `old`, None before the first look).

    refused: versions refused earlier whose files did not change -> reason; validation: this round's results for
    the new or changed versions (None: valid). Returns Refuse for each newly failed version, then exactly one Load
    or Keep.
    """
    failed = {v: reason for v, reason in sorted(validation.items()) if reason and v in new.versions}
    actions: list[Action] = [Refuse(model, v, reason) for v, reason in failed.items()]
    bad = {**{v: r for v, r in refused.items() if v in new.versions}, **failed}
    wanted = select_versions(policy, new.versions)
    serving = sorted(serving)
    still = f"still serving version(s) {', '.join(map(str, serving)) or 'none'}"
    if not wanted:
        return actions + [Keep(model, f"no version folder to load; {still}")]
    if not bad.keys() & set(wanted):
        return actions + [Load(model, tuple(wanted))]
    # A wanted version is bad: serve the versions the policy picks among the valid ones, with the served config.
    target = select_versions(policy, [v for v in new.versions if v not in bad])
    if not target or served_config is None:
        return actions + [Keep(model, f"no valid version to load; {still}")]
    config_changed = old is None or old.config != new.config
    files_changed = old is None or any(old.versions.get(v) != new.versions.get(v) for v in target)
    if target == serving and not config_changed and not files_changed:
        return actions + [Keep(model, still)]
    note = ("config.pbtxt changed too; it applies once the refused version is fixed or removed"
            if config_changed and old is not None else "")
    config = dict(served_config, version_policy={"specific": {"versions": target}})
    return actions + [Load(model, tuple(target), config, note)]


def served_model_config(config: dict | None) -> ModelConfig | None:
    """Triton's JSON config as a ModelConfig (None stays None)."""
    if config is None:
        return None
    return json_format.ParseDict(config, ModelConfig(), ignore_unknown_fields=True)


# ---------------------------------------------------------------------------------------------------- executor

def model_names(repository: Path) -> list[str]:
    return sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").is_file())


def repository_state(repository: Path) -> dict[str, Fingerprint]:
    """Every model folder's fingerprint, by model name."""
    return {m: fingerprint(repository / m) for m in model_names(repository)}


class UpdatePoller:
    """poll(): for each model whose folder changed and then stayed the same for one poll interval (a copy in
    progress is left to finish), plan the update and apply it through Admin."""

    def __init__(self, admin: Admin, repository: Path, on_load: Callable[[], None] = lambda: None,
                 validate: Callable[[Path, ModelConfig | None], str | None] = validate_version,
                 loaded: dict[str, Fingerprint] | None = None):
        self.admin, self.repository, self.on_load, self.validate = admin, repository, on_load, validate
        # What Triton was last asked to serve: `loaded` is the state taken before tritonserver started (a folder
        # added while it loaded is then new to the poller, not taken for loaded).
        self.loaded = dict(loaded) if loaded is not None else repository_state(repository)
        self.pending: dict[str, Fingerprint] = {}  # a change seen once, waiting to settle
        self.refused: dict[tuple[str, int], tuple[tuple, str]] = {}  # (model, version) -> (its files, reason)

    def models(self) -> list[str]:
        return model_names(self.repository)

    def poll(self) -> None:
        for model in self.models():
            fp = fingerprint(self.repository / model)
            if fp == self.loaded.get(model):
                self.pending.pop(model, None)
            elif fp != self.pending.get(model):  # changed since the last poll: let the copy finish first
                self.pending[model] = fp
            else:
                del self.pending[model]
                self.update(model, fp)

    def update(self, model: str, new: Fingerprint) -> None:
        old = self.loaded.get(model)
        before = self.admin.ready_versions()
        try:
            served_config = self.admin.config(model) if model in before else None
        except OSError:
            served_config = None
        files_refused = {v: files for (m, v), (files, _) in self.refused.items() if m == model}
        refused = {v: reason for (m, v), (files, reason) in self.refused.items()
                   if m == model and new.versions.get(v) == files}
        check_config = served_model_config(served_config)
        if check_config is None:
            try:
                check_config = read_config(self.repository / model)
            except (OSError, ParseError):
                check_config = None
        validation = {v: self.validate(self.repository / model / str(v), check_config)
                      for v in versions_to_validate(old, new, files_refused)}
        plan = plan_update(model, old, new, version_policy(self.repository / model),
                           [int(v) for v in before.get(model, ()) if v.isdigit()], served_config, refused, validation)
        for action in plan:
            self.apply(action, new, before)
        self.loaded[model] = new

    def apply(self, action: Action, new: Fingerprint, before: dict[str, set[str]]) -> None:
        model = action.model
        if isinstance(action, Refuse):
            self.refused[(model, action.version)] = (new.versions[action.version], action.reason)
            log.info("update: model '%s' version %s refused: %s", model, action.version, action.reason)
            return
        if isinstance(action, Keep):
            log.info("update: model '%s': %s", model, action.reason)
            return
        if action.note:
            log.info("update: model '%s': %s", model, action.note)
        refused = sorted(v for (m, v) in self.refused if m == model and v in new.versions)
        log.info("update: loading model '%s' version(s) %s%s", model, list(action.versions),
                 f" (refused: {refused})" if action.config is not None else "")
        status, message = self.admin.load(model, action.config)
        self.on_load()
        if status == 200:
            log.info("update: model '%s' now serves version(s) %s", model,
                     ", ".join(sorted(self.admin.ready_versions().get(model, ()))))
        else:
            index = self.admin.index()
            for entry in index:  # the versions Triton itself refused, with its reason
                version = entry.get("version", "")
                if (entry.get("name") == model and entry.get("state") == "UNAVAILABLE" and version.isdigit()
                        and entry.get("reason", "unloaded") != "unloaded" and int(version) in new.versions):
                    self.refused[(model, int(version))] = (new.versions[int(version)], entry["reason"][:300])
            serving = ", ".join(sorted(self.admin.ready_versions().get(model, ()))) or "none"
            log.info("update: Triton refused model '%s' (HTTP %s): %s; still serving version(s) %s", model, status,
                     message[:500], serving)
        self.admin.reload_lost(before)
