"""deploy/kubernetes: every manifest and each rendered overlay passes `kubernetes-validate --strict` and a checkov
scan, and holds what the service relies on (probes, limits, non-root, drain time, HPA on queue time, PDB).

Rendering uses `kubectl kustomize` (kustomize v5 built into kubectl); no cluster is needed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "cpu-keda")
# Whole resources outside the base (patch files are fragments: checked through the rendered overlays).
EXTRA_RESOURCES = (K8S / "overlays" / "gpu" / "engine-cache-pvc.yaml", K8S / "components" / "keda" / "scaledobject.yaml")
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}  # not in kubernetes-validate's schemas: checked field by field
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # preStop `sleep` is on by default from 1.30
QUEUE_METRIC = "triton_queue_ms_per_request"


def base_files() -> list[Path]:
    return sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: cannot render the overlays")
    return path


def checkov() -> str:
    # A separate virtual environment: checkov pins packaging<24 and networkx<2.7, which the project's does not allow.
    for candidate in (REPO_ROOT / ".venv" / "checkov" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("checkov is not installed (make install puts it in .venv/checkov)")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
        files[overlay] = out / f"{overlay}.yaml"
        files[overlay].write_text(result.stdout)
    return files


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(resources: list[dict], kind: str) -> dict:
    found = [r for r in resources if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def triton(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kubernetes_validate_strict(rendered, version):
    files = [*base_files(), *EXTRA_RESOURCES, *rendered.values()]
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version,
                             *map(str, files)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the CRDs may go unchecked; a typo in a built-in kind or apiVersion must not pass as "no schema".
    unchecked = re.findall(r"Couldn't find schema for kind (\S+) with api version (\S+)", result.stdout + result.stderr)
    assert {(api, kind) for kind, api in unchecked} <= CRD_KINDS, unchecked


def run_checkov(files: list[Path]) -> dict:
    args = [checkov(), "--quiet", "--compact", "--skip-download", "--framework", "kubernetes", "-o", "json"]
    for f in files:
        args += ["-f", str(f)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.parametrize("target", ["raw", *OVERLAYS])
def test_checkov_no_failed_checks(rendered, target):
    # Offline, checkov reports no severities: every failed check counts, and each skip must give its reason.
    # One scan per overlay: checkov merges resources of the same kind/namespace/name across files.
    files = [*base_files(), *EXTRA_RESOURCES] if target == "raw" else [rendered[target]]
    report = run_checkov(files)
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 20
    failed = [(c["check_id"], c["check_name"], c["resource"]) for c in report["results"].get("failed_checks", [])]
    assert failed == []
    for skipped in report["results"].get("skipped_checks", []):
        assert len(skipped.get("suppress_comment") or "") > 20, f"{skipped['check_id']} skipped without a reason"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_holds_a_safe_deployment(rendered, overlay):
    resources = docs(rendered[overlay])
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = triton(deployment)
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"] + pod.get("initContainers", []):
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # The grace period outlasts preStop + serve.py's drain + Triton's own stop (each up to --exit-timeout).
    args = container["args"]
    exit_timeout = int(args[args.index("--exit-timeout") + 1])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * exit_timeout

    service = next(r for r in resources if r["kind"] == "Service" and r["spec"].get("type") == "ClusterIP"
                   and r["spec"].get("clusterIP") != "None")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [8000, 8001, 8002]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert {r["metadata"].get("namespace") for r in resources} == {"hemoseg"}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_hpa_scales_on_queue_time_with_cpu_fallback(rendered, overlay):
    resources = docs(rendered[overlay])
    hpa = one(resources, "HorizontalPodAutoscaler")
    deployment = one(resources, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2  # one drains while the other serves
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert [r["name"]["as"] for r in adapter["rules"]["custom"]] == [QUEUE_METRIC]


def test_keda_replaces_the_hpa(rendered):
    resources = docs(rendered["cpu-keda"])
    assert not [r for r in resources if r["kind"] == "HorizontalPodAutoscaler"], "KEDA creates its own HPA"
    scaled = one(resources, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one(resources, "Deployment")["metadata"]["name"]
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert "nv_inference_queue_duration_us" in triggers["prometheus"]["metadata"]["query"]
    assert float(triggers["prometheus"]["metadata"]["threshold"]) > 0
    assert triggers["cpu"]["metricType"] == "Utilization"


def test_gpu_overlay_caches_the_plan(rendered):
    resources = docs(rendered["gpu"])
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = triton(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[env["HEMOSEG_ENGINE_CACHE"]]]["persistentVolumeClaim"]["claimName"]
    assert claim in {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}
    # The entrypoint writes the plan into the repository: a writable copy, filled by the init container.
    repo = mounts["/opt/hemoseg/model_repository"]
    assert any(m["name"] == repo for c in pod["initContainers"] for m in c["volumeMounts"])
    assert "nvidia.com/gpu" not in str(one(docs(rendered["cpu"]), "Deployment"))


def test_deployment_matches_the_image_and_serve_py():
    """The container runs the image's command with options serve.py knows, on the ports the image exposes."""
    deployment = one(docs(K8S / "base" / "deployment.yaml"), "Deployment")
    container = triton(deployment)
    dockerfile = (REPO_ROOT / "Dockerfile.triton").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])", dockerfile, re.MULTILINE).group(1))
    assert container["args"][:len(cmd)] == cmd
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", dockerfile, re.MULTILINE).group(1).split()}
    assert {p["containerPort"] for p in container["ports"]} == exposed
    result = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in (a for a in container["args"] if a.startswith("--")):
        assert option in result.stdout, f"serve.py has no {option}"
