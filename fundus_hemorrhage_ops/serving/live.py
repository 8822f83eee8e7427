"""The repository tritonserver serves: --model-repository as committed, plus the live A/B split, in a folder of
serve.py's run (runs.py). --model-repository itself is never written.

    <run>/traffic.json       the live state (LiveState): which unet versions to serve and the router's split
    <run>/model_repository/  per model a real folder whose entries (version folders, other files) are symbolic
                             links to the source's, and a config.pbtxt that is a link to the source's too, or,
                             for unet and unet_router while the live state changes them, a generated file:
                             the source's config with unet's version_policy / the router's traffic parameters

LiveRepository.sync() brings the served folder up to date with the source (a new version folder appears as a new
link, an edited config.pbtxt is seen through its link) and with the state; serve.py calls it before each poll of
the update poller (updates.py), which then loads what changed exactly as it loads any repository edit. A start
without --traffic has an empty state: the committed configs are served, whatever an earlier run served.

The router's split is applied only once unet serves every version it names (and the shadow version): a state
naming a version unet does not serve (its folder refused by the update check, or still loading) leaves the
router as it is, logged, until it does. This check is made here, through Triton's HTTP API, and not by the router
inside Triton: a Python model's pb_utils.is_model_ready() during its initialize while Triton is still starting
fails ("Server not ready"), and that failure path aborts tritonserver 2.51 (docs/reliability.md, A/B start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from google.protobuf import text_format
from google.protobuf.text_format import ParseError

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import GENERATED, ModelConfig, read_config
from fundus_hemorrhage.routing import Split, TrafficError, format_traffic, parse_traffic
from .runs import write_json

log = logging.getLogger(__name__)

TRAFFIC, SHADOW_VERSION, SHADOW_RATE = "traffic", "shadow_version", "shadow_rate"  # unet_router parameters
STATE_FILE = "traffic.json"
SERVED_REPOSITORY = "model_repository"
SKIPPED = ("__pycache__",)


@dataclass(frozen=True)
class RouterSplit:
    """The router's traffic parameters."""
    traffic: str = ""
    shadow_version: int | None = None
    shadow_rate: float = 0.0

    @property
    def versions(self) -> set[int]:
        """The unet versions this split sends requests to."""
        return set(parse_traffic(self.traffic).versions) | ({self.shadow_version} if self.shadow_version else set())


@dataclass(frozen=True)
class LiveState:
    """What the run serves beyond the committed configs. None: the committed config of that model."""
    unet_versions: tuple[int, ...] | None = None
    router: RouterSplit | None = None

    def to_json(self) -> dict:
        return {"unet_versions": list(self.unet_versions) if self.unet_versions is not None else None,
                "router": None if self.router is None else {
                    TRAFFIC: self.router.traffic, SHADOW_VERSION: self.router.shadow_version,
                    SHADOW_RATE: self.router.shadow_rate}}

    @classmethod
    def from_json(cls, data: dict) -> "LiveState":
        """Raises TrafficError (ValueError) for a state that cannot be served."""
        if not isinstance(data, dict):
            raise TrafficError("the live state is not a JSON object")
        versions = data.get("unet_versions")
        if versions is not None:
            if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                         for v in versions):
                raise TrafficError(f"unet_versions {versions!r} is not a list of version numbers")
            versions = tuple(sorted(set(versions)))
        router = data.get("router")
        if router is not None:
            if not isinstance(router, dict):
                raise TrafficError(f"router {router!r} is not an object")
            traffic = router.get(TRAFFIC) or ""
            if not isinstance(traffic, str):
                raise TrafficError(f"traffic {traffic!r} is not a string")
            parse_traffic(traffic)
            shadow = router.get(SHADOW_VERSION)
            if shadow is not None and (not isinstance(shadow, int) or isinstance(shadow, bool) or shadow < 1):
                raise TrafficError(f"shadow_version {shadow!r} is not a version number")
            rate = router.get(SHADOW_RATE) or 0.0
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
                raise TrafficError(f"shadow_rate {rate!r} is not in [0, 1]")
            if shadow and not parse_traffic(traffic).weights:
                raise TrafficError("a shadow version needs a split (the served versions it is compared with)")
            router = RouterSplit(format_traffic(parse_traffic(traffic)), shadow, float(rate))
        return cls(versions, router)


def state_for_split(split: Split, shadow_version: int | None = None, shadow_rate: float = 0.0) -> LiveState:
    """The live state that serves `split` (unet serves every version it names and the shadow); the empty split is
    the committed default."""
    if not split.weights:
        return LiveState()
    versions = tuple(sorted(set(split.versions) | ({shadow_version} if shadow_version else set())))
    return LiveState(versions, RouterSplit(format_traffic(split), shadow_version or None,
                                           shadow_rate if shadow_version else 0.0))


def read_state(path: Path) -> LiveState:
    """The state in `path`; the empty state when there is no file. Raises TrafficError or OSError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return LiveState()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TrafficError(f"{path}: not JSON ({exc})") from None
    return LiveState.from_json(data)


def write_state(path: Path, state: LiveState) -> None:
    write_json(Path(path), state.to_json())


def header_lines(config_path: Path) -> list[str]:
    """The comment lines heading a config.pbtxt, without the 'Generated' line."""
    header = []
    for line in config_path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text != GENERATED:
            header.append(text)
    return header


def unet_config(source: ModelConfig, versions: tuple[int, ...]) -> ModelConfig:
    config = ModelConfig()
    config.CopyFrom(source)
    config.ClearField("version_policy")
    config.version_policy.specific.versions.extend(versions)
    return config


def router_config(source: ModelConfig, split: RouterSplit) -> ModelConfig:
    config = ModelConfig()
    config.CopyFrom(source)
    config.parameters[TRAFFIC].string_value = split.traffic
    for key in (SHADOW_VERSION, SHADOW_RATE):
        config.parameters.pop(key, None)
    if split.shadow_version:
        config.parameters[SHADOW_VERSION].string_value = str(split.shadow_version)
        config.parameters[SHADOW_RATE].string_value = f"{split.shadow_rate:g}"
    return config


def _replace_with_link(link: Path, target: Path) -> None:
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _write_file(path: Path, text: str) -> bool:
    """Write `path` atomically unless it already is a file with this text; True if written."""
    if path.is_file() and not path.is_symlink():
        with contextlib.suppress(OSError):
            if path.read_text() == text:
                return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


class LiveRepository:
    """`root`: the repository tritonserver serves, made from `source` (--model-repository, read only) and the
    live state in `state_file`."""

    def __init__(self, source: Path, root: Path, state_file: Path):
        self.source, self.root, self.state_file = Path(source).resolve(), Path(root), Path(state_file)
        self.state = LiveState()  # the last readable state
        self.router_applied: RouterSplit | None = None  # the router split the served config carries
        self.waiting: RouterSplit | None = None  # a wanted split whose unet versions are not all served (logged)
        self.unreadable: str | None = None  # the last error reading the state file (logged once)

    def set_state(self, state: LiveState) -> None:
        write_state(self.state_file, state)

    def read_state(self) -> LiveState:
        """The state file's state; the last readable one (logged) when it cannot be read."""
        try:
            state = read_state(self.state_file)
        except (TrafficError, OSError) as exc:
            if str(exc) != self.unreadable:
                log.info("live state %s cannot be used (%s); serving %s as before", self.state_file, exc,
                         self.state.to_json())
                self.unreadable = str(exc)
            return self.state
        self.state, self.unreadable = state, None
        return state

    def models(self) -> list[str]:
        return sorted(d.name for d in self.source.iterdir() if (d / "config.pbtxt").is_file())

    def sync(self, ready_unet: Callable[[], set[int]] | None = None) -> None:
        """Bring `root` up to date. `ready_unet`: the unet versions Triton serves now (READY); None before Triton
        runs, when everything is applied (Triton then loads unet's versions and the router together)."""
        state = self.read_state()
        self.root.mkdir(parents=True, exist_ok=True)
        models = self.models()
        for entry in self.root.iterdir():
            if entry.name not in models and not entry.name.startswith("."):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        router = self.router_split(state.router, ready_unet)
        for model in models:
            self._sync_model(model, state, router)

    def router_split(self, wanted: RouterSplit | None, ready_unet) -> RouterSplit | None:
        """The router split to serve now: `wanted`, once unet serves its versions; else the one applied before."""
        if wanted == self.router_applied:
            self.waiting = None
            return wanted
        if wanted is not None and ready_unet is not None:
            try:
                ready = ready_unet()
            except OSError as exc:
                log.info("live state: cannot read the unet versions served (%s); the router keeps its split", exc)
                return self.router_applied
            missing = sorted(wanted.versions - ready)
            if missing:
                if wanted != self.waiting:
                    log.info("live state: traffic '%s' (shadow %s) waits until %s serves version(s) %s; served: "
                             "%s; the router keeps traffic '%s'", wanted.traffic, wanted.shadow_version or "none",
                             c.SEGMENTATION_MODEL, ", ".join(map(str, missing)),
                             ", ".join(map(str, sorted(ready))) or "none",
                             self.router_applied.traffic if self.router_applied else "as committed")
                    self.waiting = wanted
                return self.router_applied
        self.waiting = None
        self.router_applied = wanted
        return wanted

    def _sync_model(self, model: str, state: LiveState, router: RouterSplit | None) -> None:
        src, dst = self.source / model, self.root / model
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            dst.unlink()
        dst.mkdir(exist_ok=True)
        wanted = {e.name for e in src.iterdir()
                  if e.name != "config.pbtxt" and e.name not in SKIPPED and not e.name.startswith(".")}
        for entry in dst.iterdir():
            if entry.name not in wanted and entry.name != "config.pbtxt" and not entry.name.startswith("."):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for name in sorted(wanted):
            _replace_with_link(dst / name, src / name)
        generated = None
        try:
            if model == c.SEGMENTATION_MODEL and state.unet_versions is not None:
                generated = unet_config(read_config(src), state.unet_versions)
            elif model == c.ROUTER and router is not None:
                generated = router_config(read_config(src), router)
        except (OSError, ParseError) as exc:  # a config being edited: served through its link, as Triton reads it
            log.info("live state: %s/config.pbtxt cannot be read (%s); served as it is", src, exc)
            generated = None
        if generated is None:
            _replace_with_link(dst / "config.pbtxt", src / "config.pbtxt")
            return
        header = header_lines(src / "config.pbtxt") + [
            f"Served by serve.py: {src / 'config.pbtxt'} with the live A/B state of {self.state_file}"]
        text = "".join(f"# {line}\n" for line in header) + text_format.MessageToString(generated)
        _write_file(dst / "config.pbtxt", text)


def served_split(repository_root: Path) -> dict[str, str]:
    """The router parameters of a served repository's unet_router config (for show/tests)."""
    from fundus_hemorrhage.model_config import parameters
    return parameters(read_config(Path(repository_root) / c.ROUTER))

