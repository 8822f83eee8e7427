"""Set the A/B traffic split between unet versions of a running serve.py (its live state; the repository's files
are never written).

    python -m fundus_hemorrhage_ops.serving.traffic --set "3:70,2:30" [--shadow 3 --shadow-rate 0.1]
                                                [--url http://127.0.0.1:8000 | --model-repository model_repository]
    python -m fundus_hemorrhage_ops.serving.traffic --set ""      # back to the committed default (the newest version)
    python -m fundus_hemorrhage_ops.serving.traffic --show [--url ...]

The split is live state of one serve.py run (.triton/runs/<pid>/traffic.json, live.py): it lasts while that
serve.py runs, survives its tritonserver restarts, and ends with it; the next start serves the committed configs
again, or the split of its own --traffic. The run is the one answering --url, else the only one serving
--model-repository (default ./model_repository) from this checkout.

Make before break, each step applied by serve.py's update poller under the same lock as its other reloads:
1. unet serves the versions the split names (weight 0 included: still served for pins) and the shadow version, in
   addition to those it serves now; waits until each is READY (GET /v2/models/unet/versions/N/ready). A version
   that does not become ready (refused by the update check, see serve.py's log) stops here: the state is put back;
2. unet_router gets the split (parameters `traffic`, `shadow_version`, `shadow_rate`); waits until the served router
   config shows it. serve.py applies a router split only once unet serves every version it names;
3. unet stops serving the versions the new split no longer names.
Requests in flight finish on the router that took them; new ones use the new split (Triton swaps the instances).
Uses only public endpoints: no admin key is needed (the run's folder is the access control).
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
from fundus_hemorrhage.model_config import parameters, read_config, version_numbers
from fundus_hemorrhage.routing import Split, TrafficError, parse_traffic, parse_version
from .live import (SHADOW_RATE, SHADOW_VERSION, STATE_FILE, TRAFFIC, LiveState, RouterSplit, read_state,
                   state_for_split, write_state)
from .runs import RUNTIME_DIR, Run, find_run
from .updates import select_versions, version_policy


def served_versions_needed(split: Split, shadow_version: int | None) -> list[int]:
    """Every version unet must serve for `split` and the shadow, ascending."""
    return sorted(set(split.versions) | ({shadow_version} if shadow_version else set()))


def check_split(repository: Path, split: Split, shadow_version: int | None = None, shadow_rate: float = 0.0) -> None:
    """Raises TrafficError for a version without a folder in `repository`, a shadow rate outside [0, 1], or a
    shadow without a split to compare with."""
    needed = served_versions_needed(split, shadow_version)
    folders = set(version_numbers(Path(repository) / c.SEGMENTATION_MODEL))
    missing = [v for v in needed if v not in folders]
    if missing:
        raise TrafficError(f"no version folder {c.SEGMENTATION_MODEL}/{', '.join(map(str, missing))} in {repository}")
    if not 0.0 <= shadow_rate <= 1.0:
        raise TrafficError(f"shadow rate {shadow_rate} is not in [0, 1]")
    if shadow_version and not split.weights:
        raise TrafficError("a shadow version needs a split (the served versions it is compared with)")


def committed_unet_versions(repository: Path) -> list[int]:
    """The unet versions the committed config serves (its version_policy over the version folders)."""
    unet = Path(repository) / c.SEGMENTATION_MODEL
    return select_versions(version_policy(unet), version_numbers(unet))


def committed_router(repository: Path) -> dict[str, str]:
    params = parameters(read_config(Path(repository) / c.ROUTER))
    return {TRAFFIC: params.get(TRAFFIC, ""), SHADOW_VERSION: params.get(SHADOW_VERSION, "")}


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


def _url(url: str | None, run: Run) -> str:
    url = url or run.http_url or ""
    if not url:
        raise TrafficError(f"serve.py run {run.dir} records no HTTP URL; pass --url")
    return url if "://" in url else f"http://{url}"


def apply(split: Split, shadow_version: int | None = None, shadow_rate: float = 0.0, url: str | None = None,
          model_repository: Path | None = None, timeout: float = 300.0, log=print,
          runtime_dir: Path = RUNTIME_DIR) -> None:
    """Serve `split` (with the shadow) on the serve.py run answering `url` (else the only one serving
    `model_repository`), step by step (module docstring). Raises TrafficError when there is no such run, the split
    cannot be served, or a step is not applied within `timeout` seconds (the state is then left as it was)."""
    try:
        run = find_run(url, model_repository, runtime_dir)
    except LookupError as exc:
        raise TrafficError(str(exc)) from None
    source = run.model_repository
    check_split(source, split, shadow_version, shadow_rate)
    url = _url(url, run)
    state_file = run.dir / STATE_FILE
    current = read_state(state_file)
    target = state_for_split(split, shadow_version, shadow_rate)
    serving = list(current.unet_versions) if current.unet_versions is not None else committed_unet_versions(source)
    wanted = list(target.unet_versions) if target.unet_versions is not None else committed_unet_versions(source)
    both = tuple(sorted(set(serving) | set(wanted)))

    # 1. unet serves the new versions as well
    write_state(state_file, LiveState(both, current.router))
    log(f"unet: serving version(s) {', '.join(map(str, both))} (state written; waiting for serve.py) ...")
    if not _wait(lambda: all(version_ready(url, v) for v in wanted), timeout):
        write_state(state_file, current)
        raise TrafficError(f"unet does not serve version(s) {[v for v in wanted if not version_ready(url, v)]} after "
                           f"{timeout:.0f} s (refused? see serve.py's log); the split was not changed")
    # 2. the router's split
    write_state(state_file, LiveState(both, target.router))
    router = target.router or RouterSplit()
    expect = ({TRAFFIC: router.traffic, SHADOW_VERSION: str(router.shadow_version or "")} if target.router
              else committed_router(source))
    log(f"{c.ROUTER}: traffic '{expect[TRAFFIC] or 'newest'}' (state written; waiting for serve.py) ...")

    def router_serves() -> bool:
        served = served_router_parameters(url) or {}
        return all(served.get(k, "") == v for k, v in expect.items())

    if not _wait(router_serves, timeout):
        write_state(state_file, LiveState(both, current.router))
        raise TrafficError(f"{c.ROUTER} does not serve traffic '{expect[TRAFFIC]}' after {timeout:.0f} s; it keeps "
                           f"serving {served_router_parameters(url)} (see serve.py's log)")
    # 3. unet stops serving the versions the split no longer names
    write_state(state_file, target)
    dropped = sorted(set(both) - set(wanted))
    if dropped and not _wait(lambda: not any(version_ready(url, v) for v in dropped), timeout):
        log(f"unet: version(s) {dropped} still served after {timeout:.0f} s (see serve.py's log)")
    log(f"{c.ROUTER}: now serving traffic '{expect[TRAFFIC] or 'newest'}'"
        + (f", shadow version {shadow_version} on {shadow_rate:.0%} of requests" if shadow_version else "")
        + (f"; unet no longer serves version(s) {', '.join(map(str, dropped))}" if dropped else ""))


def show(url: str | None = None, model_repository: Path | None = None, runtime_dir: Path = RUNTIME_DIR) -> dict:
    """The run's live state, the committed default and what its router serves."""
    try:
        run = find_run(url, model_repository, runtime_dir)
    except LookupError as exc:
        raise TrafficError(str(exc)) from None
    return {"run": str(run.dir), "model_repository": str(run.model_repository),
            "state": read_state(run.dir / STATE_FILE).to_json(),
            "committed": committed_router(run.model_repository),
            "served": served_router_parameters(_url(url, run))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                   help="find the serve.py run serving this repository (default ./model_repository)")
    p.add_argument("--url", help="serve.py's public HTTP URL: the run to change (when several run)")
    p.add_argument("--runtime-dir", type=Path, default=RUNTIME_DIR, help=f"serve.py's work folder ({RUNTIME_DIR})")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--set", metavar="SPLIT", help='"VERSION:WEIGHT,..." e.g. "3:70,2:30"; "" = committed default')
    what.add_argument("--show", action="store_true", help="print the live state and the split served")
    p.add_argument("--shadow", type=parse_version, metavar="VERSION", help="also run VERSION as a shadow")
    p.add_argument("--shadow-rate", type=float, default=0.1, help="share of requests shadowed (default 0.1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each step")
    args = p.parse_args(argv)
    repository = None if args.url else args.model_repository
    try:
        if args.show:
            print(json.dumps(show(args.url, repository, args.runtime_dir), indent=2))
            return 0
        split = parse_traffic(args.set)
        apply(split, args.shadow, args.shadow_rate if args.shadow else 0.0, args.url, repository, args.timeout,
              runtime_dir=args.runtime_dir)
    except TrafficError as exc:
        print(f"traffic: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

