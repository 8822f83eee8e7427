"""Set the A/B traffic split between unet versions, in the model repository that serve.py serves.

    python -m fundus_hemorrhage_ops.serving.traffic --set "3:70,2:30" [--shadow 3 --shadow-rate 0.1]
                                                [--model-repository model_repository] [--url http://127.0.0.1:8000]
    python -m fundus_hemorrhage_ops.serving.traffic --set ""          # no split: the newest version serves (default)
    python -m fundus_hemorrhage_ops.serving.traffic --show --url http://127.0.0.1:8000

The repository's files are the one source of truth, so a split survives restarts and serve.py's update poller
applies it under the same lock as its other reloads (the stub watchdog is told; nothing is dropped):

1. `unet/config.pbtxt`: version_policy `specific` = the versions the split names (weight 0 included: still served
   for pins) and the shadow version; back to `latest 1` for no split. With --url, waits until Triton serves each
   of them (GET /v2/models/unet/versions/N/ready); a version that does not become ready (refused by the update
   check, see serve.py's log) stops here and the split is not written;
2. `unet_router/config.pbtxt`: parameters `traffic`, `shadow_version`, `shadow_rate`. With --url, waits until the
   served router config shows it. The router itself refuses a split naming a version unet does not serve (the
   load fails, the router loaded before keeps serving).

`serve.py --traffic SPLIT` does step 1 and 2 on the files before Triton starts. Requests in flight finish on the
router that took them; new ones use the new split (Triton swaps the instances). Uses only public endpoints: no
admin key is needed (the file system is the access control).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from fundus_hemorrhage import contract as c
from fundus_hemorrhage.model_config import GENERATED, ModelConfig, config_text, parameters, read_config, write_config
from fundus_hemorrhage.routing import Split, TrafficError, format_traffic, parse_traffic, parse_version

TRAFFIC, SHADOW_VERSION, SHADOW_RATE = "traffic", "shadow_version", "shadow_rate"  # unet_router parameters


def _header(path: Path) -> list[str]:
    """The comment lines heading a config.pbtxt (kept when it is rewritten), without the 'Generated' line."""
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text != GENERATED:
            header.append(text)
    return header


def _write(model_dir: Path, config: ModelConfig) -> None:
    """Rewrite config.pbtxt only if it changes (a rewrite alone makes serve.py reload the model)."""
    header = _header(model_dir / "config.pbtxt")
    if config_text(config, header) != (model_dir / "config.pbtxt").read_text():
        write_config(model_dir, config, header)


def served_versions_needed(split: Split, shadow_version: int | None) -> list[int]:
    """Every version unet must serve for `split` and the shadow, ascending."""
    return sorted(set(split.versions) | ({shadow_version} if shadow_version else set()))


def write_split(repository: Path, split: Split, shadow_version: int | None = None, shadow_rate: float = 0.0,
                *, router: bool = True, unet: bool = True) -> list[int]:
    """Write the split into the repository's unet (version policy) and unet_router (parameters) configs.
    Returns the unet versions now named. Raises TrafficError for a version without a folder, a shadow rate outside
    [0, 1], or a shadow without a split to compare with; OSError/ParseError for unreadable configs."""
    repository = Path(repository)
    needed = served_versions_needed(split, shadow_version)
    missing = [v for v in needed if not (repository / c.SEGMENTATION_MODEL / str(v)).is_dir()]
    if missing:
        raise TrafficError(f"no version folder {c.SEGMENTATION_MODEL}/{', '.join(map(str, missing))} in {repository}")
    if not 0.0 <= shadow_rate <= 1.0:
        raise TrafficError(f"shadow rate {shadow_rate} is not in [0, 1]")
    if unet:
        unet_dir = repository / c.SEGMENTATION_MODEL
        config = read_config(unet_dir)
        config.ClearField("version_policy")
        if needed:
            config.version_policy.specific.versions.extend(needed)
        else:
            config.version_policy.latest.num_versions = 1
        _write(unet_dir, config)
    if router:
        router_dir = repository / c.ROUTER
        config = read_config(router_dir)
        config.parameters[TRAFFIC].string_value = format_traffic(split)
        for key in (SHADOW_VERSION, SHADOW_RATE):
            config.parameters.pop(key, None)
        if shadow_version:
            config.parameters[SHADOW_VERSION].string_value = str(shadow_version)
            config.parameters[SHADOW_RATE].string_value = f"{shadow_rate:g}"
        _write(router_dir, config)
    return needed


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def version_ready(url: str, version: int) -> bool:
    return _get(f"{url}/v2/models/{c.SEGMENTATION_MODEL}/versions/{version}/ready")[0] == 200


def served_router_parameters(url: str) -> dict[str, str] | None:
    """The served unet_router config's parameters; None if it is not served."""
    status, body = _get(f"{url}/v2/models/{c.ROUTER}/config")
    if status != 200:
        return None
    return {k: v.get("string_value", "") for k, v in json.loads(body).get("parameters", {}).items()}


def _wait(condition, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def apply(repository: Path, split: Split, shadow_version: int | None, shadow_rate: float, url: str | None,
          timeout: float = 300.0, log=print) -> None:
    """Write the split (unet versions first, then, once served, the router's split); with `url`, wait for serve.py
    to apply each step. Raises TrafficError when a step is not applied within `timeout` seconds."""
    if url and "://" not in url:
        url = f"http://{url}"
    needed = write_split(repository, split, shadow_version, shadow_rate, router=url is None)
    if url is None:
        log(f"wrote traffic '{format_traffic(split) or 'newest'}' (unet versions {needed or 'latest 1'}) to "
            f"{repository}; serve.py applies it at start or within two --poll-interval")
        return
    log(f"unet: serving version(s) {', '.join(map(str, needed)) or 'newest'} (written; waiting for serve.py) ...")
    if not _wait(lambda: all(version_ready(url, v) for v in needed), timeout):
        raise TrafficError(f"unet does not serve version(s) {[v for v in needed if not version_ready(url, v)]} after "
                           f"{timeout:.0f} s (refused? see serve.py's log); the split was not changed")
    write_split(repository, split, shadow_version, shadow_rate, unet=False)
    wanted = format_traffic(split)
    log(f"{c.ROUTER}: traffic '{wanted or 'newest'}' (written; waiting for serve.py) ...")
    if not _wait(lambda: (served_router_parameters(url) or {}).get(TRAFFIC, "") == wanted
                 and (served_router_parameters(url) or {}).get(SHADOW_VERSION, "") == str(shadow_version or ""),
                 timeout):
        raise TrafficError(f"{c.ROUTER} does not serve traffic '{wanted}' after {timeout:.0f} s; it keeps serving "
                           f"{served_router_parameters(url)} (see serve.py's log)")
    log(f"{c.ROUTER}: now serving traffic '{wanted or 'newest'}'"
        + (f", shadow version {shadow_version} on {shadow_rate:.0%} of requests" if shadow_version else ""))


def show(repository: Path, url: str | None) -> dict:
    """The split in the repository's files and, with `url`, the one served."""
    out = {"repository": parameters(read_config(Path(repository) / c.ROUTER))}
    if url:
        url = url if "://" in url else f"http://{url}"
        out["served"] = served_router_parameters(url)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--url", help="serve.py's HTTP URL: wait until it serves the new split")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--set", metavar="SPLIT", help='"VERSION:WEIGHT,..." e.g. "3:70,2:30"; "" = newest version')
    what.add_argument("--show", action="store_true", help="print the split in the files (and the served one)")
    p.add_argument("--shadow", type=parse_version, metavar="VERSION", help="also run VERSION as a shadow")
    p.add_argument("--shadow-rate", type=float, default=0.1, help="share of requests shadowed (default 0.1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each step with --url")
    args = p.parse_args(argv)
    if args.show:
        print(json.dumps(show(args.model_repository, args.url), indent=2))
        return 0
    try:
        split = parse_traffic(args.set)
        if args.shadow and not split.weights:
            raise TrafficError("a shadow version needs a split (the served versions it is compared with)")
        apply(args.model_repository, split, args.shadow, args.shadow_rate if args.shadow else 0.0, args.url,
              args.timeout)
    except TrafficError as exc:
        print(f"traffic: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
