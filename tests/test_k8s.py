"""Kubernetes manifests (deploy/k8s/): valid against the bundled Kubernetes JSON schemas (offline, strict:
unknown fields are errors), and the settings the deployment promises: non-root, read-only root file
system, probes on the service's health endpoints, sized resources, read-only weights, matching selectors."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"  # the oldest release whose schemas we check against (still supported upstream)
VARIANTS = ("cpu", "cuda")
PEAK_RSS = 3 * 10**9  # measured peak RSS of the service with both bundled models (bytes)


def _documents(folder: Path) -> list[dict]:
    return [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _by_kind(variant: str) -> dict[str, dict]:
    docs = _documents(K8S / variant)
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), f"{variant}: one object per kind"
    return kinds


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if str(quantity).endswith(unit):
            return int(float(str(quantity)[: -len(unit)]) * factor)
    return int(quantity)


ALL = sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(K8S)) for p in ALL])
def test_manifest_validates_against_kubernetes_schemas(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        for version in (KUBERNETES_VERSION, kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_catches_mistakes():
    """The validator is really checking: a misspelt field and a wrong type are refused."""
    deployment = _by_kind("cpu")["Deployment"]
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(deployment))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_has_its_objects(variant):
    assert set(_by_kind(variant)) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_non_root_with_read_only_root(variant):
    pod = _by_kind(variant)["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (docker/Dockerfile CASC_UID)
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == f"casc-detector:{variant}"  # the tag docker/README.md builds


@pytest.mark.parametrize("variant", VARIANTS)
def test_writable_paths_are_empty_dirs_and_weights_are_read_only(variant):
    pod = _by_kind(variant)["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert "emptyDir" in volumes[mounts["/home/casc/.cache"]["name"]]
    weights = mounts["/weights"]
    assert weights["readOnly"] is True
    claim = volumes[weights["name"]]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    (pvc,) = _documents(K8S)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == claim["claimName"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_hit_the_health_endpoints(variant):
    container = _by_kind(variant)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000  # the image's CASC_PORT
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_are_sized_from_the_peak_rss(variant):
    container = _by_kind(variant)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert PEAK_RSS < _bytes(requests["memory"]) <= _bytes(limits["memory"]) <= 3 * PEAK_RSS
    assert requests["cpu"] == limits["cpu"]  # the HPA's utilisation is against what the pod may use
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CASC_THREADS"] == str(requests["cpu"])
    assert env["CASC_DEVICE"] == variant
    if variant == "cuda":
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_hpa_and_pdb_select_the_deployment(variant):
    objects = _by_kind(variant)
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert objects["Service"]["spec"]["selector"] == labels
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_video_temp_files_fit_the_tmp_volume(variant):
    """The service's disk budget for video temp files (--max-video-disk-mb) stays below the emptyDir mounted on
    /tmp, so uploads are refused (503) before the pod is evicted for going over its sizeLimit."""
    from service.config import Settings

    deployment = _by_kind(variant)["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/tmp"])
    assert Settings().max_video_disk_bytes < _bytes(volume["emptyDir"]["sizeLimit"])
