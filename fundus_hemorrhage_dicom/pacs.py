"""Orthanc from the repository's configuration (deploy/orthanc/), and `make run-pacs`: Orthanc + the Triton
service (serve.py) + the gateway, on loopback.

    python -m fundus_hemorrhage_dicom.pacs [--dicom-port 4242] [--http-port 8042] [--aet HEMOSEG]
        [--dicom-allow 127.0.0.1,::1] [--work-dir .pacs] [--stable-age 5] [-- serve.py options]

`start_orthanc` writes the run's configuration (deploy/orthanc/orthanc.json with the ports, AE title, storage
folder and stable age of this run; the C-STORE peer filter from dicom_peers.lua.in) into its work folder and
starts the Debian package's `Orthanc` on it; the tests and the benchmark use it on free ports in a temporary
folder. Orthanc keeps its database in <work-dir>/db, so a restart on the same folder keeps the studies and the
/changes sequence.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "deploy" / "orthanc"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
# what a run sets in the repository's configuration; everything else is taken as it is
RUN_KEYS = ("HttpPort", "DicomPort", "DicomAet", "StableAge", "StorageDirectory", "IndexDirectory", "LuaScripts")


def orthanc_binary() -> str:
    """`Orthanc` on PATH (Debian's package installs /usr/sbin/Orthanc); FileNotFoundError with what to install."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise FileNotFoundError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (make install)")
    return found


def write_config(work_dir: Path, http_port: int, dicom_port: int, aet: str, stable_age: int,
                 dicom_allow: tuple[str, ...] = LOOPBACK, base: Path = CONFIG_DIR / "orthanc.json") -> Path:
    """The run's orthanc.json (and Lua filter) in `work_dir`, from `base` (plain JSON, no comments); its path."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(Path(base).read_text())
    lua = (CONFIG_DIR / "dicom_peers.lua.in").read_text().replace(
        "@ALLOWED@", ", ".join(f'["{ip}"] = true' for ip in dicom_allow))
    (work_dir / "dicom_peers.lua").write_text(lua)
    config.update(zip(RUN_KEYS, (http_port, dicom_port, aet, stable_age, str(work_dir / "db"), str(work_dir / "db"),
                                 [str(work_dir / "dicom_peers.lua")])))
    path = work_dir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, and SIGKILL after `timeout` seconds; returns once it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def gateway_process(orthanc_url: str, triton_url: str, state_dir: Path, log_path: Path,
                    poll_interval: float = 0.3, backoff_max: float = 4.0) -> subprocess.Popen:
    """The gateway as its own process (python -m fundus_hemorrhage_dicom.gateway), logging to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fundus_hemorrhage_dicom.gateway", "--orthanc", orthanc_url, "--triton",
             triton_url, "--state-dir", str(state_dir), "--poll-interval", str(poll_interval), "--backoff-max",
             str(backoff_max)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


@dataclass
class OrthancProcess:
    process: subprocess.Popen
    config: Path
    http_port: int
    dicom_port: int
    aet: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.process, timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout: float = 60.0) -> OrthancProcess:
        """Stopped (if running) and started again on the same configuration and database."""
        self.stop()
        return launch(self.config, self.http_port, self.dicom_port, self.aet, self.log_path, timeout)


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode} while starting")
        try:
            if requests.get(f"{url}/system", timeout=2).status_code in (200, 401):  # 401: it answers, with users
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Orthanc did not answer at {url} within {timeout:.0f} s")


def launch(config: Path, http_port: int, dicom_port: int, aet: str, log_path: Path,
           timeout: float = 60.0) -> OrthancProcess:
    log = open(log_path, "ab")
    process = subprocess.Popen([orthanc_binary(), str(config)], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    log.close()
    orthanc = OrthancProcess(process, config, http_port, dicom_port, aet, log_path)
    try:
        wait_ready(orthanc.url, process, timeout)
    except RuntimeError as exc:
        orthanc.kill()
        raise RuntimeError(f"{exc}; log {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return orthanc


def start_orthanc(work_dir: Path, http_port: int = 8042, dicom_port: int = 4242, aet: str = "HEMOSEG",
                  stable_age: int = 5, dicom_allow: tuple[str, ...] = LOOPBACK, timeout: float = 60.0,
                  base: Path = CONFIG_DIR / "orthanc.json") -> OrthancProcess:
    """Orthanc on the configuration `base` (default the repository's) with this run's ports, in `work_dir`;
    returns once its REST API answers. Raises RuntimeError (with the log's tail) when it does not start."""
    work_dir = Path(work_dir).resolve()
    config = write_config(work_dir, http_port, dicom_port, aet, stable_age, dicom_allow, base)
    return launch(config, http_port, dicom_port, aet, work_dir / "orthanc.log", timeout)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dicom-port", type=int, default=4242)
    p.add_argument("--http-port", type=int, default=8042, help="Orthanc's REST and DICOMweb port (loopback)")
    p.add_argument("--aet", default="HEMOSEG", help="Orthanc's AE title (cameras send to it)")
    p.add_argument("--dicom-allow", default=",".join(LOOPBACK),
                   help="comma-separated IP addresses allowed to C-STORE (default: loopback only)")
    p.add_argument("--stable-age", type=int, default=5, help="seconds without a new photo before a study is stable")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".pacs")
    p.add_argument("--orthanc-config", type=Path, default=CONFIG_DIR / "orthanc.json",
                   help="base Orthanc configuration, plain JSON (e.g. a copy with TLS and users: README)")
    p.add_argument("--grpc-port", type=int, default=8001, help="serve.py's gRPC port (the gateway's Triton)")
    p.add_argument("serve_args", nargs="*", help="after --: options for serve.py")
    args = p.parse_args(argv)
    args.dicom_allow = tuple(a.strip() for a in args.dicom_allow.split(",") if a.strip())
    return args


def main(argv: list[str] | None = None) -> int:
    from fundus_hemorrhage import client as service

    from .gateway import Gateway, Settings, auth_from_env

    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--grpc-port", str(args.grpc_port),
                              *args.serve_args], cwd=REPO_ROOT, start_new_session=True)
    orthanc = None
    try:
        client = service.make_client(f"127.0.0.1:{args.grpc_port}", "grpc")
        deadline = time.monotonic() + 300
        while True:
            try:
                service.check_server(client, "grpc", f"127.0.0.1:{args.grpc_port}")
                break
            except service.ServerNotReady:
                if serve.poll() is not None or time.monotonic() > deadline:
                    print("run-pacs: serve.py did not become ready", file=sys.stderr)
                    return 1
                time.sleep(1)
        orthanc = start_orthanc(args.work_dir / "orthanc", args.http_port, args.dicom_port, args.aet,
                                args.stable_age, args.dicom_allow, base=args.orthanc_config)
        print(f"Orthanc is ready: DICOM {args.aet}@127.0.0.1:{args.dicom_port} (C-STORE from "
              f"{', '.join(args.dicom_allow)}), REST {orthanc.url}, DICOMweb {orthanc.dicomweb_url}/, log "
              f"{orthanc.log_path}", flush=True)
        gateway = Gateway(Settings(orthanc_url=orthanc.url, orthanc_auth=auth_from_env(),
                                   triton_url=f"127.0.0.1:{args.grpc_port}",
                                   state_dir=args.work_dir / "gateway"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: gateway.stopping.set())
        watcher = threading.Thread(target=lambda: (serve.wait(), gateway.stopping.set()), daemon=True)
        watcher.start()
        gateway.run()
    finally:
        if orthanc is not None:
            orthanc.stop()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)  # serve.py drains, then stops Triton
            serve.wait(90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
