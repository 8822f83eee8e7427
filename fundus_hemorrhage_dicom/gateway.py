"""The DICOM gateway: a Triton client that watches Orthanc for stable studies, segments their OP photos with the
ensemble (gRPC, fundus_hemorrhage.client) and stores SEG + SR + overlay back into the same study.

    python -m fundus_hemorrhage_dicom.gateway --orthanc http://127.0.0.1:8042 --triton 127.0.0.1:8001 \
        --state-dir .pacs/gateway

How it learns of studies: Orthanc's REST /changes feed, polled (not the Python plugin: orthanc-python is AGPL,
and a plugin runs inside Orthanc's process, so a gateway crash or a slow inference would be Orthanc's; over REST
the gateway is a separate process with its own restarts). A StableStudy change processes the study; a NewStudy
change puts it on a pending list, processed when Orthanc says IsStable, so a study whose stability timer Orthanc
lost in a restart (Orthanc keeps it in memory) is still processed.

Exactly once, across restarts and outages:
  * the last change processed and the pending list are in <state-dir>/state.json, written atomically after each
    change; a restart goes on from there;
  * each photo's outputs have UIDs derived from its SOP Instance UID and the model version (ids.py), so storing
    them again after a kill between store and state write gives Orthanc's "AlreadyStored", not a duplicate;
  * a photo done (or refused) is marked with the user metadata FundusHemorrhageResult on its instance: a study
    seen again (storing results fires StableStudy again) skips it without inference: no loop;
  * the gateway's own instances (Manufacturer fundus_hemorrhage) are never candidates;
  * Orthanc or Triton unreachable: the change is not passed, it is retried with back-off (1 s doubling to 30 s).
Bad input is refused per instance with a logged reason (source.Refused, results.ServiceRefused): nothing else in
the study fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fundus_hemorrhage import client as service
from fundus_hemorrhage.client import one_line
from fundus_hemorrhage.contract import MAX_BATCH_SIZE
from fundus_hemorrhage.files import write_atomically

from .codes import MANUFACTURER
from .orthanc import Orthanc, OrthancError, OrthancUnavailable
from .results import ServiceRefused, outputs_for, software_version, to_part10
from .source import Refused, read_photo

log = logging.getLogger("fundus_hemorrhage_dicom.gateway")


class TritonUnavailable(Exception):
    """The ensemble cannot be reached or is not ready; one line."""


@dataclass
class State:
    """What survives a restart: the last /changes sequence number passed, and the studies waiting to be stable."""
    path: Path
    last_change: int = 0
    pending: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(path, int(data["last_change"]), list(data.get("pending", [])))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps({"last_change": self.last_change, "pending": self.pending}))


@dataclass
class Settings:
    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_auth: tuple[str, str] | None = None
    triton_url: str = "127.0.0.1:8001"
    state_dir: Path = Path(".pacs/gateway")
    poll_interval: float = 1.0  # seconds between /changes polls when there is nothing new
    backoff_start: float = 1.0  # seconds; doubled per failed try up to backoff_max
    backoff_max: float = 30.0
    request_timeout: float = 300.0  # seconds one ensemble request may take
    batch_size: int = MAX_BATCH_SIZE
    tries_per_change: int = 5  # unexpected errors (not outages) before a change is passed, with an ERROR line


class Gateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.orthanc = Orthanc(settings.orthanc_url, settings.orthanc_auth)
        self.state = State.load(Path(settings.state_dir) / "state.json")
        self.stopping = threading.Event()
        self.version = software_version()
        self._client = None
        self.in_progress: tuple[str, object] | None = None  # what step() is on: ("change", seq) or a pending study

    # -- Triton
    def client(self):
        if self._client is None:
            self._client = service.make_client(self.settings.triton_url, "grpc")
        return self._client

    def segment(self, images: list[bytes]):
        """One ensemble request; TritonUnavailable when the server is down or not ready."""
        try:
            return service.segment_batch(self.client(), "grpc", images, timeout=self.settings.request_timeout)
        except Exception as exc:
            reason = service.error_text(exc)
            try:
                service.check_server(self.client(), "grpc", self.settings.triton_url)
            except service.ServerNotReady as not_ready:
                raise TritonUnavailable(str(not_ready)) from None
            raise TritonUnavailable(f"request failed while the server is ready: {reason}") from None

    # -- one study
    def candidates(self, study_id: str) -> list[tuple[str, dict]]:
        """(instance id, series main tags) of the study's instances not done yet and not the gateway's own."""
        study = self.orthanc.study(study_id)
        if study is None:
            log.info("study %s: deleted from Orthanc, nothing to do", study_id)
            return []
        out = []
        for series_id in study["Series"]:
            series = self.orthanc.series(series_id)
            if series is None:
                continue
            tags = series.get("MainDicomTags", {})
            if tags.get("Manufacturer") == MANUFACTURER:  # our SEG/SR/overlay series
                continue
            out += [(i, tags) for i in series["Instances"] if self.orthanc.metadata(i) is None]
        return out

    def mark(self, instance_id: str, outcome: str) -> None:
        self.orthanc.set_metadata(instance_id, outcome)

    def refuse(self, instance_id: str, name: str, reason: str) -> None:
        log.warning("%s: refused: %s", name, reason)
        self.mark(instance_id, f"refused: {reason}")

    def process_study(self, study_id: str) -> int:
        """Segments the study's OP photos not done yet and stores their outputs; the number of photos done.
        Raises OrthancUnavailable / TritonUnavailable (the caller retries the whole study; what was done stays
        done)."""
        photos = []
        for instance_id, series_tags in self.candidates(study_id):
            name = f"instance {instance_id} of study {study_id}"
            if series_tags.get("Modality") != "OP":
                self.refuse(instance_id, name, f"not an ophthalmic photograph (modality "
                                               f"{series_tags.get('Modality') or '?'}): skipped")
                continue
            data = self.orthanc.instance_file(instance_id)
            if data is None:
                continue
            try:
                photo = read_photo(data)
            except Refused as exc:
                self.refuse(instance_id, name, str(exc))
                continue
            except Exception as exc:  # a file that trips pydicom in a way read_photo does not foresee
                self.refuse(instance_id, name, f"cannot be read: {type(exc).__name__}: {one_line(exc)}")
                continue
            photos.append((instance_id, f"instance {photo.sop_instance_uid} of study {study_id}", photo))
        done = 0
        for start in range(0, len(photos), self.settings.batch_size):
            batch = photos[start:start + self.settings.batch_size]
            results = self.segment([p.image_bytes for _, _, p in batch])
            for (instance_id, name, photo), result in zip(batch, results):
                done += self.store_outputs(instance_id, name, photo, result)
        return done

    def store_outputs(self, instance_id: str, name: str, photo, result) -> int:
        try:
            outputs = outputs_for(photo, result, self.version)
        except ServiceRefused as exc:
            self.refuse(instance_id, name, str(exc))
            return 0
        except Exception as exc:  # highdicom refusing a value: this photo's outputs only, never the study's
            log.exception("%s: building the DICOM outputs failed", name)
            self.refuse(instance_id, name, f"the DICOM outputs could not be built: {type(exc).__name__}: "
                                           f"{one_line(exc)}")
            return 0
        stored = []
        for ds in outputs.datasets:
            try:
                answer = self.orthanc.store(to_part10(ds))
            except OrthancError as exc:  # Orthanc refused this instance (4xx): say so, keep the others
                self.refuse(instance_id, name, f"Orthanc refused its {ds.Modality}: {exc}")
                return 0
            stored.append(f"{ds.Modality}={ds.SOPInstanceUID} ({answer.get('Status')})")
        for note in outputs.notes:
            log.warning("%s: %s", name, note)
        log.info("%s: unet v%s, %s: %s", name, outputs.model_version, result.status, ", ".join(stored))
        self.mark(instance_id, f"{result.status}: unet v{outputs.model_version}: "
                               + " ".join(str(ds.SOPInstanceUID) for ds in outputs.datasets))
        return 1

    # -- the feed
    def handle(self, change) -> None:
        if change.resource_type != "Study":
            return
        if change.change_type == "NewStudy" and change.resource_id not in self.state.pending:
            self.state.pending.append(change.resource_id)
        elif change.change_type == "StableStudy":
            self.process_study(change.resource_id)
            if change.resource_id in self.state.pending:
                self.state.pending.remove(change.resource_id)

    def check_pending(self) -> None:
        """Pending studies Orthanc calls stable (e.g. their timer was lost in an Orthanc restart)."""
        for study_id in list(self.state.pending):
            self.in_progress = ("pending study", study_id)
            study = self.orthanc.study(study_id)
            if study is None or study.get("IsStable"):
                if study is not None:
                    self.process_study(study_id)
                self.state.pending.remove(study_id)
                self.state.save()

    def step(self) -> bool:
        """One page of /changes (or the pending check when there is none); True when there was something new."""
        changes, done, last = self.orthanc.changes(self.state.last_change)
        for change in changes:
            self.in_progress = ("change", change.seq)
            self.handle(change)
            self.state.last_change = change.seq
            self.state.save()
        if not changes and last > self.state.last_change:  # only changes we skip over, e.g. after a log purge
            self.state.last_change = last
            self.state.save()
        if done:
            self.check_pending()
        return not done or bool(changes)

    def give_up(self) -> None:
        """Passes what failed `tries_per_change` times (a change, or a pending study), with an ERROR line."""
        kind, key = self.in_progress or ("change", self.state.last_change + 1)
        log.error("passing %s %s after %d failed tries: its study needs a look", kind, key,
                  self.settings.tries_per_change)
        if kind == "change":
            self.state.last_change = max(self.state.last_change, int(key))
        elif key in self.state.pending:
            self.state.pending.remove(key)
        self.state.save()

    def run(self) -> None:
        """Until `stopping` is set: poll, process, back off while Orthanc or Triton is away."""
        delay, failures = self.settings.backoff_start, 0
        log.info("gateway %s: Orthanc %s, Triton %s (gRPC), from change %d", self.version,
                 self.settings.orthanc_url, self.settings.triton_url, self.state.last_change)
        while not self.stopping.is_set():
            try:
                busy = self.step()
                delay = self.settings.backoff_start
            except (OrthancUnavailable, TritonUnavailable) as exc:
                log.warning("waiting %.0f s, then retrying change %d: %s", delay, self.state.last_change + 1, exc)
                self.stopping.wait(delay)
                delay = min(delay * 2, self.settings.backoff_max)
                continue
            except Exception:  # a bug or an answer nobody foresaw: retried, then passed, never a crash loop
                failures += 1
                log.exception("%s %s failed (%d of %d tries)", *(self.in_progress or ("change", "?")), failures,
                              self.settings.tries_per_change)
                if failures >= self.settings.tries_per_change:
                    self.give_up()
                    failures = 0
                self.stopping.wait(delay)
                continue
            failures = 0
            if not busy:
                self.stopping.wait(self.settings.poll_interval)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's REST URL")
    p.add_argument("--triton", default="127.0.0.1:8001", help="the ensemble's gRPC host:port")
    p.add_argument("--state-dir", type=Path, default=Path(".pacs/gateway"),
                   help="where the last change processed is kept (default .pacs/gateway)")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls when idle")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest wait between retries, seconds")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.poll_interval <= 0 or args.backoff_max <= 0:
        p.error("--poll-interval and --backoff-max must be positive")
    return args


def auth_from_env() -> tuple[str, str] | None:
    """Orthanc's HTTP basic-auth user and password from ORTHANC_USER and ORTHANC_PASSWORD (never from the command
    line, where other users of the machine can read them); None when either is unset."""
    user, password = os.environ.get("ORTHANC_USER"), os.environ.get("ORTHANC_PASSWORD")
    return (user, password) if user and password else None


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the command line and, for Orthanc's credentials, the environment (auth_from_env)."""
    return Settings(orthanc_url=args.orthanc, orthanc_auth=auth_from_env(),
                    triton_url=args.triton, state_dir=args.state_dir, poll_interval=args.poll_interval,
                    backoff_max=args.backoff_max)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = Gateway(settings_from(args))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: gateway.stopping.set())
    gateway.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
