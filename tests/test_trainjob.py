"""The TrainJob launcher against the in-process Kubernetes API emulator (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8s_emulator import K8sEmulator, Script
from mixgrpo import trainjob_schema
from mixgrpo.trainjob import (
    DEFAULT_SECRET_ENV,
    LaunchError,
    SecretEnv,
    Toleration,
    TrainJobFailed,
    TrainJobSpec,
    TrainJobTimeout,
    WaitPolicy,
    accelerate_command,
    build_trainjob,
    connect,
    run_trainjob,
    torchrun_command,
)

NS = "team-a"
FAST = WaitPolicy(timeout_s=20, poll_initial_s=0.05, poll_max_s=0.2, log_grace_s=5)


def spec(name: str = "mixgrpo-train-r1", **overrides) -> TrainJobSpec:
    fields = dict(name=name, namespace=NS, image="registry.example.com/mixgrpo-trainer:abc123",
                  command=torchrun_command(["train", "--config", "s3://runs/r1/config.yaml"]),
                  num_nodes=2, gpus_per_node=8, pipeline_run_id="run-1", queue="gpu-queue",
                  env={"MIXGRPO_OUTPUT": "s3://runs/r1"}, node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                  cpu_per_node="64", memory_per_node="900Gi", active_deadline_s=86400)
    fields.update(overrides)
    return TrainJobSpec(**fields)


@pytest.fixture
def k8s() -> Iterator[K8sEmulator]:
    with K8sEmulator() as emulator:
        yield emulator


def test_built_trainjob_is_exactly_right() -> None:
    labels = {"app.kubernetes.io/name": "mixgrpo", "app.kubernetes.io/component": "train",
              "app.kubernetes.io/managed-by": "mixgrpo-launcher", "mixgrpo.io/pipeline-run-id": "run-1"}
    amounts = {"cpu": "64", "memory": "900Gi", "nvidia.com/gpu": "8"}
    expected = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "mixgrpo-train-r1", "namespace": NS,
                     "labels": {**labels, "kueue.x-k8s.io/queue-name": "gpu-queue"}},
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": "mixgrpo-torch"},
            "trainer": {
                "image": "registry.example.com/mixgrpo-trainer:abc123",
                "command": ["torchrun", "-m", "mixgrpo.cli", "train", "--config", "s3://runs/r1/config.yaml"],
                "numNodes": 2,
                "numProcPerNode": 8,
                "resourcesPerNode": {"requests": amounts, "limits": amounts},
                "env": [
                    {"name": "MIXGRPO_OUTPUT", "value": "s3://runs/r1"},
                    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-s3", "key": "AWS_ACCESS_KEY_ID"}}},
                    {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
                    {"name": "AWS_ENDPOINT_URL", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-s3", "key": "AWS_ENDPOINT_URL", "optional": True}}},
                    {"name": "AWS_REGION", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-s3", "key": "AWS_REGION", "optional": True}}},
                    {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-mlflow", "key": "MLFLOW_TRACKING_URI"}}},
                    {"name": "MLFLOW_TRACKING_USERNAME", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-mlflow", "key": "MLFLOW_TRACKING_USERNAME", "optional": True}}},
                    {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mixgrpo-mlflow", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}}},
                ],
            },
            "runtimePatches": [{
                "manager": "mixgrpo.io/launcher",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        },
                    }}},
                }]}}},
            }],
            "activeDeadlineSeconds": 86400,
        },
    }
    assert build_trainjob(spec()) == expected


def test_minimal_trainjob_leaves_optional_parts_out() -> None:
    job = build_trainjob(TrainJobSpec(name="t", namespace="ns", image="img:1", command=("python", "-V"),
                                      gpus_per_node=0, secret_env=(), tolerations=()))
    assert job["metadata"]["labels"] == {"app.kubernetes.io/name": "mixgrpo", "app.kubernetes.io/component": "train",
                                         "app.kubernetes.io/managed-by": "mixgrpo-launcher"}
    assert job["spec"]["trainer"] == {"image": "img:1", "command": ["python", "-V"], "numNodes": 1,
                                      "resourcesPerNode": {"requests": {}, "limits": {}}}
    assert "activeDeadlineSeconds" not in job["spec"]
    trainjob_schema.validate(job)


def test_trainjob_validates_against_the_trainer_api_models() -> None:
    job = build_trainjob(spec())
    trainjob_schema.validate(job)  # the published models accept it
    job["spec"]["trainer"]["numNode"] = 2  # a typo would be silently dropped by the models' from_dict
    with pytest.raises(trainjob_schema.TrainerSchemaError, match=r"spec\.trainer\.numNode\b"):
        trainjob_schema.validate(job)
    del job["spec"]["trainer"]["numNode"]
    job["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(trainjob_schema.TrainerSchemaError, match="numNodes"):
        trainjob_schema.validate(job)
    job["spec"]["trainer"]["numNodes"] = 2
    del job["spec"]["runtimeRef"]["name"]
    with pytest.raises(trainjob_schema.TrainerSchemaError, match="name"):
        trainjob_schema.validate(job)


def test_secrets_are_referenced_never_inlined() -> None:
    env = build_trainjob(spec())["spec"]["trainer"]["env"]
    by_name = {e["name"]: e for e in env}
    for ref in DEFAULT_SECRET_ENV:
        assert "value" not in by_name[ref.env]
        assert by_name[ref.env]["valueFrom"]["secretKeyRef"]["name"] == ref.secret
    with pytest.raises(ValueError, match="SecretEnv"):
        spec(env={"AWS_SECRET_ACCESS_KEY": "hunter2"})
    with pytest.raises(ValueError, match="SecretEnv"):
        spec(env={"HF_TOKEN": "hf_abc"})
    with pytest.raises(ValueError, match="one of them"):
        spec(env={"AWS_REGION": "eu-west-1"})  # already a secret reference


@pytest.mark.parametrize("bad, match", [
    (dict(name="Bad_Name"), "DNS-1035"),
    (dict(name="x" * 64), "DNS-1035"),
    (dict(num_nodes=0), "num_nodes"),
    (dict(command=()), "torchrun_command"),
    (dict(pipeline_run_id="a b"), "label value"),
    (dict(active_deadline_s=0), "active_deadline_s"),
])
def test_spec_errors_name_the_fix(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        spec(**bad)


def test_success_streams_node0_logs_and_deletes_the_job(k8s: K8sEmulator) -> None:
    lines = [f"iteration {i} reward 0.{i}" for i in range(20)]
    k8s.script("mixgrpo-train-r1", Script(outcome="succeed", logs=lines))
    out: list[str] = []
    result = run_trainjob(spec(), connect(k8s.host), FAST, sink=out.append)

    assert [line for line in out if not line.startswith("[launcher]")] == lines
    assert result.condition.type == "Complete" and result.log_tail[-1] == lines[-1]
    (create,) = k8s.requests_to("POST", "/trainjobs")
    assert create.body == build_trainjob(spec())  # exactly the built object went over the wire
    (delete,) = k8s.requests_to("DELETE", "/trainjobs/mixgrpo-train-r1")
    assert delete.query["propagationPolicy"] == ["Foreground"]
    assert not k8s.jobs and not k8s.pods
    logs = k8s.requests_to("GET", "/log")
    assert logs and all(r.query["follow"] in (["true"], ["True"]) and r.query["container"] == ["node"] for r in logs)
    assert "-node-0-0-" in logs[0].path  # node 0, not node 1


def test_failure_raises_with_the_jobs_reason_and_last_log_lines(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="fail", logs=["loading FLUX", "CUDA out of memory"],
                                          reason="JobSetFailed", message="jobset failed: node-0 exit code 137"))
    with pytest.raises(TrainJobFailed, match="JobSetFailed: jobset failed: node-0 exit code 137") as info:
        run_trainjob(spec(), connect(k8s.host), FAST, sink=lambda line: None)
    assert info.value.reason == "JobSetFailed"
    assert "CUDA out of memory" in str(info.value)
    assert not k8s.jobs  # deleted on exit


def test_timeout_deletes_the_job_and_raises(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="hang", logs=["step 1"]))
    policy = WaitPolicy(timeout_s=0.6, poll_initial_s=0.05, poll_max_s=0.1, log_grace_s=2)
    started = time.monotonic()
    with pytest.raises(TrainJobTimeout, match="within 1 s"):
        run_trainjob(spec(), connect(k8s.host), policy, sink=lambda line: None)
    assert time.monotonic() - started < 5
    assert k8s.requests_to("DELETE", "/trainjobs/mixgrpo-train-r1")
    assert not k8s.jobs and not k8s.pods


def test_timeout_with_label_cleanup_keeps_the_job_labelled_and_suspended(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="hang"))
    policy = WaitPolicy(timeout_s=0.4, poll_initial_s=0.05, poll_max_s=0.1, cleanup="label", log_grace_s=1)
    with pytest.raises(TrainJobTimeout):
        run_trainjob(spec(), connect(k8s.host), policy, sink=lambda line: None)
    job = k8s.jobs[(NS, "mixgrpo-train-r1")]
    assert job["metadata"]["labels"]["mixgrpo.io/outcome"] == "timeout"
    assert job["spec"]["suspend"] is True
    assert not k8s.requests_to("DELETE")
    (patch,) = k8s.requests_to("PATCH")
    assert patch.content_type == "application/merge-patch+json"


def test_success_with_label_cleanup_labels_without_suspending(k8s: K8sEmulator) -> None:
    policy = WaitPolicy(timeout_s=20, poll_initial_s=0.05, poll_max_s=0.2, cleanup="label")
    run_trainjob(spec(), connect(k8s.host), policy, sink=lambda line: None)
    job = k8s.jobs[(NS, "mixgrpo-train-r1")]
    assert job["metadata"]["labels"]["mixgrpo.io/outcome"] == "succeeded"
    assert "suspend" not in job["spec"]


def test_a_retried_step_follows_the_job_of_its_own_run(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="succeed", logs=["a", "b"], start_delay_s=0.3))
    k8s.create_job(NS, build_trainjob(spec()))  # created by the first attempt of this run's step
    out: list[str] = []
    run_trainjob(spec(), connect(k8s.host), FAST, sink=out.append)
    assert any("already exists for pipeline run run-1" in line for line in out)
    assert [line for line in out if not line.startswith("[launcher]")] == ["a", "b"]


def test_a_job_of_another_run_is_left_alone(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="hang"))
    k8s.create_job(NS, build_trainjob(spec(pipeline_run_id="run-0")))
    with pytest.raises(LaunchError, match="belongs to another run"):
        run_trainjob(spec(), connect(k8s.host), FAST, sink=lambda line: None)
    assert (NS, "mixgrpo-train-r1") in k8s.jobs and not k8s.requests_to("DELETE")


def test_a_job_deleted_by_someone_else_fails_loudly(k8s: K8sEmulator) -> None:
    k8s.script("mixgrpo-train-r1", Script(outcome="hang"))

    def sink(line: str) -> None:
        if "created" in line:
            k8s.delete_job(NS, "mixgrpo-train-r1")

    with pytest.raises(LaunchError, match="disappeared"):
        run_trainjob(spec(), connect(k8s.host), FAST, sink=sink)


def test_an_unreachable_api_server_names_the_host() -> None:
    with K8sEmulator() as k8s:
        host = k8s.host  # closed on exit: nothing listens there any more
    with pytest.raises(LaunchError, match=f"cannot reach the Kubernetes API at {host}"):
        run_trainjob(spec(), connect(host), FAST, sink=lambda line: None)


def test_torchrun_reads_the_trainers_pet_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.run import get_args_parser

    for key, value in {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job",
                       "PET_MASTER_PORT": "29400", "PET_NPROC_PER_NODE": "8"}.items():
        monkeypatch.setenv(key, value)
    command = torchrun_command(["train", "--config", "c.yaml"])
    args = get_args_parser().parse_args(list(command[1:]))
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port, args.nproc_per_node) == (
        "2", 1, "job-node-0-0.job", 29400, "8")
    assert args.module and args.training_script == "mixgrpo.cli"
    assert args.training_script_args == ["train", "--config", "c.yaml"]


def test_accelerate_command_maps_pet_variables_and_keeps_arguments_whole(tmp_path: Path) -> None:
    fake = tmp_path / "accelerate"
    fake.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PET_NNODES": "2", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "10.0.0.1", "PET_MASTER_PORT": "29500", "PET_NPROC_PER_NODE": "4"}
    command = accelerate_command("/etc/mixgrpo/accelerate config.yaml", ["train", "--config", "a b.yaml", "optim.lr=$HOME"])
    argv = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    assert argv == ["launch", "--config_file", "/etc/mixgrpo/accelerate config.yaml", "--num_machines", "2",
                    "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500",
                    "--num_processes", "8", "-m", "mixgrpo.cli", "train", "--config", "a b.yaml", "optim.lr=$HOME"]


def test_custom_secret_refs_and_tolerations() -> None:
    job = build_trainjob(spec(secret_env=(SecretEnv("HF_TOKEN", "hub", "token", optional=True),),
                              tolerations=(Toleration("dedicated", "Equal", "ml", "NoExecute"),)))
    assert job["spec"]["trainer"]["env"][-1] == {
        "name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "token", "optional": True}}}
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]


def test_sigterm_from_a_cancelled_run_cleans_up(k8s: K8sEmulator) -> None:
    import signal
    import threading

    k8s.script("mixgrpo-train-r1", Script(outcome="hang"))
    killer = threading.Timer(0.5, os.kill, args=(os.getpid(), signal.SIGTERM))
    killer.start()
    try:
        with pytest.raises(LaunchError, match="interrupted"):
            run_trainjob(spec(), connect(k8s.host), FAST, sink=lambda line: None)
    finally:
        killer.cancel()
    assert k8s.requests_to("DELETE", "/trainjobs/mixgrpo-train-r1") and not k8s.jobs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
