"""The train step on a cluster: create a Kubeflow Trainer v2 ``TrainJob``, follow it, clean up.

Usage::

    spec = TrainJobSpec(name="mixgrpo-train-1a2b", namespace="team-a", image=image_ref("trainer"),
                        command=torchrun_command(["train", "--config", "s3://bucket/run/config.yaml"]),
                        num_nodes=2, gpus_per_node=8, pipeline_run_id="1a2b...")
    result = run_trainjob(spec, connect())          # streams node-0 logs; raises when the job fails

The TrainJob points at the project's ClusterTrainingRuntime ``mixgrpo-torch``
(``manifests/cluster/trainer-runtime.yaml``: torch ML policy, container ``node``, ``/dev/shm``
in memory, non-root). The Trainer injects ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
``PET_MASTER_PORT`` and ``PET_NPROC_PER_NODE`` into every node; torchrun reads them by itself and
:func:`accelerate_command` passes them to ``accelerate launch``. Credentials reach the pods only as
``secretKeyRef`` references (:class:`SecretEnv`): no secret value is ever part of the object.

Waiting polls the job with capped exponential backoff; a thread follows the node-0 pod's log
(following its replacement if the pod is recreated). On every exit (success, failure, timeout,
SIGTERM from a cancelled pipeline run) the job is deleted or labelled, as :class:`WaitPolicy` says.
``kubernetes`` is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import collections
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mixgrpo import trainjob_schema

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
DEFAULT_RUNTIME = "mixgrpo-torch"
NODE_CONTAINER = "node"  # the torch runtime's training container (and replicated job) name
PATCH_MANAGER = "mixgrpo.io/launcher"
RUN_ID_LABEL = "mixgrpo.io/pipeline-run-id"
OUTCOME_LABEL = "mixgrpo.io/outcome"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Labels the JobSet controller puts on the pods of a TrainJob (the Trainer SDK selects node-0 the same way).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SECRET_LIKE = re.compile(r"(SECRET|PASSWORD|TOKEN|PRIVATE_KEY|CREDENTIALS)", re.IGNORECASE)


class LaunchError(RuntimeError):
    """The TrainJob could not be created or followed."""


class TrainJobFailed(LaunchError):
    """The TrainJob reached its ``Failed`` condition."""

    def __init__(self, message: str, *, reason: str, detail: str) -> None:
        super().__init__(message)
        self.reason, self.detail = reason, detail


class TrainJobTimeout(LaunchError):
    """The TrainJob did not finish within :attr:`WaitPolicy.timeout_s`."""


class _Terminated(BaseException):
    """SIGTERM arrived (the pipeline run was cancelled): clean up, then exit."""


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable filled from a key of a Kubernetes Secret (never a literal value)."""

    env: str  # variable name in the training container
    secret: str  # Secret name in the job's namespace
    key: str  # key inside the Secret
    optional: bool = False  # True: the pod starts even if the Secret or key is missing

    def to_k8s(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": self.secret, "key": self.key}
        if self.optional:
            ref["optional"] = True
        return {"name": self.env, "valueFrom": {"secretKeyRef": ref}}


S3_SECRET = "mixgrpo-s3"
MLFLOW_SECRET = "mixgrpo-mlflow"
# The keys of the Secret templates in manifests/base/secrets.yaml.
DEFAULT_SECRET_ENV: tuple[SecretEnv, ...] = (
    SecretEnv("AWS_ACCESS_KEY_ID", S3_SECRET, "AWS_ACCESS_KEY_ID"),
    SecretEnv("AWS_SECRET_ACCESS_KEY", S3_SECRET, "AWS_SECRET_ACCESS_KEY"),
    SecretEnv("AWS_ENDPOINT_URL", S3_SECRET, "AWS_ENDPOINT_URL", optional=True),
    SecretEnv("AWS_REGION", S3_SECRET, "AWS_REGION", optional=True),
    SecretEnv("MLFLOW_TRACKING_URI", MLFLOW_SECRET, "MLFLOW_TRACKING_URI"),
    SecretEnv("MLFLOW_TRACKING_USERNAME", MLFLOW_SECRET, "MLFLOW_TRACKING_USERNAME", optional=True),
    SecretEnv("MLFLOW_TRACKING_PASSWORD", MLFLOW_SECRET, "MLFLOW_TRACKING_PASSWORD", optional=True),
)


@dataclass(frozen=True)
class Toleration:
    """A pod toleration (``operator="Exists"`` tolerates every value of ``key``)."""

    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    def to_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator}
        if self.value is not None:
            out["value"] = self.value
        if self.effect is not None:
            out["effect"] = self.effect
        return out


GPU_TOLERATION = Toleration("nvidia.com/gpu", "Exists", effect="NoSchedule")


@dataclass(frozen=True)
class TrainJobSpec:
    """Everything that goes into one TrainJob. Validated on construction."""

    name: str  # DNS-1035 label, at most 63 characters (it also names the JobSet and the pods)
    namespace: str
    image: str  # the trainer image (container_images.image_ref("trainer"))
    command: tuple[str, ...]  # torchrun_command(...) / accelerate_command(...)
    num_nodes: int = 1
    gpus_per_node: int = 8  # nvidia.com/gpu per node; also the processes per node
    runtime: str = DEFAULT_RUNTIME  # ClusterTrainingRuntime name
    env: Mapping[str, str] = field(default_factory=dict)  # plain, non-secret variables
    secret_env: tuple[SecretEnv, ...] = DEFAULT_SECRET_ENV
    cpu_per_node: str | None = None  # e.g. "32"; None: the runtime's / namespace default
    memory_per_node: str | None = None  # e.g. "512Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = (GPU_TOLERATION,)
    queue: str | None = None  # Kueue LocalQueue name: adds the kueue.x-k8s.io/queue-name label
    pipeline_run_id: str | None = None  # KFP run id: labels the job and its pods
    labels: Mapping[str, str] = field(default_factory=dict)
    active_deadline_s: int | None = None  # server-side limit: the Trainer stops the job even without us

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "secret_env", tuple(self.secret_env))
        object.__setattr__(self, "tolerations", tuple(self.tolerations))
        _check_spec(self)


def _check_spec(spec: TrainJobSpec) -> None:
    for what, value in (("name", spec.name), ("namespace", spec.namespace), ("runtime", spec.runtime)):
        if not _DNS_LABEL.match(value) or len(value) > 63:
            raise ValueError(f"TrainJob {what} {value!r} is not a DNS-1035 label: use at most 63 lowercase letters, digits and '-', starting with a letter")
    if spec.num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {spec.num_nodes}")
    if spec.gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be >= 0, got {spec.gpus_per_node}")
    if not spec.command:
        raise ValueError("command is empty: use torchrun_command([...]) or accelerate_command(...)")
    if not spec.image:
        raise ValueError("image is empty: use mixgrpo.container_images.image_ref('trainer')")
    if spec.active_deadline_s is not None and spec.active_deadline_s < 1:
        raise ValueError(f"active_deadline_s must be >= 1 or None, got {spec.active_deadline_s}")
    for key, value in {**spec.labels, "pipeline_run_id": spec.pipeline_run_id or "", "queue": spec.queue or ""}.items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ValueError(f"{key}={value!r} is not a valid label value: at most 63 letters, digits, '-', '_', '.'")
    leaked = sorted(name for name in spec.env if _SECRET_LIKE.search(name))
    if leaked:
        raise ValueError(f"env {leaked} look like secrets: never put secret values in the TrainJob; pass SecretEnv(...) references in secret_env")

    secret_names = [s.env for s in spec.secret_env]
    clash = sorted(set(spec.env) & set(secret_names))
    if clash:
        raise ValueError(f"env and secret_env both set {clash}: keep each variable in one of them")

def _labels(spec: TrainJobSpec) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "mixgrpo", "app.kubernetes.io/component": "train",
              "app.kubernetes.io/managed-by": "mixgrpo-launcher", **spec.labels}
    if spec.pipeline_run_id:
        labels[RUN_ID_LABEL] = spec.pipeline_run_id
    return labels


def _resources(spec: TrainJobSpec) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if spec.cpu_per_node:
        amounts["cpu"] = spec.cpu_per_node
    if spec.memory_per_node:
        amounts["memory"] = spec.memory_per_node
    if spec.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_patch(spec: TrainJobSpec) -> dict[str, Any]:
    """The runtime patch for the ``node`` pods: labels, node selector, tolerations."""
    pod_spec: dict[str, Any] = {}
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in spec.tolerations]
    pod = {"metadata": {"labels": _labels(spec)}, "spec": pod_spec}
    replicated = {"name": NODE_CONTAINER, "template": {"spec": {"template": pod}}}
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}}}


def build_trainjob(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob object for ``spec`` (a plain dict, as sent to the API server)."""
    labels = _labels(spec)
    if spec.queue:
        labels[QUEUE_LABEL] = spec.queue
    env = [{"name": k, "value": v} for k, v in spec.env.items()] + [s.to_k8s() for s in spec.secret_env]
    trainer: dict[str, Any] = {"image": spec.image, "command": list(spec.command), "numNodes": spec.num_nodes}
    if spec.gpus_per_node:
        trainer["numProcPerNode"] = spec.gpus_per_node
    trainer["resourcesPerNode"] = _resources(spec)
    if env:
        trainer["env"] = env
    job_spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": spec.runtime},
        "trainer": trainer,
        "runtimePatches": [_pod_patch(spec)],
    }
    if spec.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_s
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels}, "spec": job_spec}


# -- commands ---------------------------------------------------------------------------------

def torchrun_command(train_args: Sequence[str], module: str = "mixgrpo.cli") -> tuple[str, ...]:
    """``torchrun -m mixgrpo.cli <train_args>``; torchrun reads the Trainer's PET_* variables itself."""
    return ("torchrun", "-m", module, *train_args)


def accelerate_command(config_file: str, train_args: Sequence[str], module: str = "mixgrpo.cli") -> tuple[str, ...]:
    """``accelerate launch --config_file F ... -m mixgrpo.cli <train_args>`` wired to the PET_* variables.

    ``accelerate`` does not read PET_*, so a ``bash -c`` line maps them onto its flags
    (``--num_processes`` is the total: nodes x processes per node); ``train_args`` are passed as
    positional parameters, never re-parsed by the shell.
    """
    script = (f"exec accelerate launch --config_file {shlex.quote(config_file)} "
              '--num_machines "$PET_NNODES" --machine_rank "$PET_NODE_RANK" '
              '--main_process_ip "$PET_MASTER_ADDR" --main_process_port "$PET_MASTER_PORT" '
              '--num_processes "$((PET_NNODES * PET_NPROC_PER_NODE))" '
              f'-m {shlex.quote(module)} "$@"')
    return ("bash", "-c", script, "mixgrpo-train", *train_args)


# -- connection -------------------------------------------------------------------------------

def connect(host: str | None = None, *, token: str | None = None, kubeconfig: str | None = None,
            context: str | None = None, verify_ssl: bool = True) -> Any:
    """A ``kubernetes.client.ApiClient``: explicit ``host`` (tests), else in-cluster, else kubeconfig."""
    import os

    from kubernetes import client, config

    if host:
        cfg = client.Configuration()
        cfg.host = host
        cfg.verify_ssl = verify_ssl
        if token:
            cfg.api_key = {"authorization": token}
            cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        config.load_incluster_config()
        return client.ApiClient()
    try:
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        raise LaunchError(f"no Kubernetes configuration: run inside a cluster, set KUBECONFIG, or pass host= ({exc})") from exc


# -- waiting ----------------------------------------------------------------------------------

Cleanup = Literal["delete", "label"]


@dataclass(frozen=True)
class WaitPolicy:
    """How long to wait, how often to look, and what to do with the job afterwards."""

    timeout_s: float = 72 * 3600  # from creation, queueing time included
    poll_initial_s: float = 2.0  # first status poll interval; doubles up to poll_max_s
    poll_max_s: float = 30.0
    cleanup: Cleanup = "delete"  # on every exit; "label": keep it, labelled mixgrpo.io/outcome (suspended on timeout)
    log_grace_s: float = 15.0  # after the job finishes, how long to wait for the log stream to drain
    max_api_errors: int = 8  # consecutive transient API errors before giving up

    def __post_init__(self) -> None:
        if self.cleanup not in ("delete", "label"):
            raise ValueError(f"cleanup must be 'delete' or 'label', got {self.cleanup!r}")
        if self.timeout_s <= 0 or self.poll_initial_s <= 0 or self.poll_max_s < self.poll_initial_s:
            raise ValueError("need timeout_s > 0 and 0 < poll_initial_s <= poll_max_s")


@dataclass(frozen=True)
class Condition:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class TrainJobResult:
    name: str
    namespace: str
    condition: Condition  # the Complete condition
    seconds: float
    log_tail: tuple[str, ...]  # the last lines of node-0's log


def terminal_condition(job: Mapping[str, Any]) -> Condition | None:
    """The job's ``Complete`` or ``Failed`` condition when it is true, else None."""
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return Condition(cond["type"], cond.get("reason", ""), cond.get("message", ""))
    return None


def _condition_summary(job: Mapping[str, Any]) -> str:
    conds = job.get("status", {}).get("conditions") or []
    return ", ".join(f"{c.get('type')}={c.get('status')}({c.get('reason', '')})" for c in conds) or "no conditions yet"


class _LogFollower(threading.Thread):
    """Follows the node-0 pod's log to ``sink``; follows a replacement pod if one appears."""

    def __init__(self, core: Any, namespace: str, job: str, sink: Callable[[str], None], poll_s: float) -> None:
        super().__init__(name=f"logs-{job}", daemon=True)
        self.core, self.namespace, self.job, self.sink, self.poll_s = core, namespace, job, sink, poll_s
        self.finishing = threading.Event()  # the job is done: drain the open stream, then return
        self.stop = threading.Event()  # give up now (timeout, interrupt)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.followed: set[str] = set()

    def run(self) -> None:
        selector = f"{JOBSET_NAME_LABEL}={self.job},{REPLICATED_JOB_LABEL}={NODE_CONTAINER},{JOB_INDEX_LABEL}=0"
        while True:
            final = self.finishing.is_set()  # one more pass after the job finished: catches short-lived pods
            try:
                for pod in self.core.list_namespaced_pod(self.namespace, label_selector=selector).items:
                    if self.stop.is_set():
                        return
                    if pod.metadata.uid not in self.followed and pod.status.phase in ("Running", "Succeeded", "Failed"):
                        self._follow(pod.metadata.name)
                        self.followed.add(pod.metadata.uid)
            except Exception as exc:  # noqa: BLE001 - logs are best effort; status polling decides the outcome
                if not self.stop.is_set():
                    self.sink(f"[launcher] cannot read node-0 logs yet: {_short(exc)}")
            if final or self.stop.is_set():
                return
            self.finishing.wait(self.poll_s)

    def _follow(self, pod: str) -> None:
        response = self.core.read_namespaced_pod_log(pod, self.namespace, container=NODE_CONTAINER,
                                                     follow=True, _preload_content=False)
        try:
            for line in _lines(response.stream(amt=None, decode_content=True)):
                self.tail.append(line)
                self.sink(line)
        finally:
            response.release_conn()


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *done, pending = pending.split(b"\n")
        for raw in done:
            yield raw.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


def _short(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    return f"HTTP {status} {reason}" if status else f"{type(exc).__name__}: {exc}"


def _is_transient(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in (0, 429) or (exc.status or 0) >= 500
    return isinstance(exc, (HTTPError, ConnectionError, TimeoutError))


class _Job:
    """The TrainJob's API calls, named."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self.custom, self.core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.ref = f"TrainJob {namespace}/{name}"

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def patch(self, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name, body)

    def delete(self) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                    propagation_policy="Foreground")


def _create_or_adopt(job: _Job, body: dict[str, Any], sink: Callable[[str], None]) -> None:
    """Create the job; if it exists from an earlier attempt of the same pipeline run, follow that one."""
    from kubernetes.client.exceptions import ApiException

    try:
        job.create(body)
        sink(f"[launcher] created {job.ref}")
        return
    except ApiException as exc:
        if exc.status != 409:
            raise LaunchError(f"could not create {job.ref}: {_short(exc)}: {exc.body}") from exc
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS
        host = job.custom.api_client.configuration.host
        raise LaunchError(f"cannot reach the Kubernetes API at {host} to create {job.ref}: {_short(exc)}; "
                          "check the host / kubeconfig / in-cluster service account") from exc
    existing = job.get()
    run_id = body["metadata"]["labels"].get(RUN_ID_LABEL)
    if run_id and existing.get("metadata", {}).get("labels", {}).get(RUN_ID_LABEL) == run_id:
        sink(f"[launcher] {job.ref} already exists for pipeline run {run_id} (a retried step): following it")
        return
    raise LaunchError(f"{job.ref} already exists and belongs to another run: choose another name, "
                      f"or delete it (kubectl delete trainjob -n {job.namespace} {job.name})")


def _wait(job: _Job, policy: WaitPolicy, deadline: float, sink: Callable[[str], None]) -> Condition:
    from kubernetes.client.exceptions import ApiException

    delay, errors, seen = policy.poll_initial_s, 0, ""
    while True:
        try:
            state = job.get()
            errors = 0
        except Exception as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, ApiException) and exc.status == 404:
                raise LaunchError(f"{job.ref} disappeared while running (deleted by someone else?)") from exc
            errors += 1
            if not _is_transient(exc) or errors > policy.max_api_errors:
                raise LaunchError(f"cannot read {job.ref}: {_short(exc)}") from exc
            state = None
        if state is not None:
            summary = _condition_summary(state)
            if summary != seen:
                sink(f"[launcher] {job.ref}: {summary}")
                seen = summary
            cond = terminal_condition(state)
            if cond is not None:
                return cond
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TrainJobTimeout(f"{job.ref} did not finish within {policy.timeout_s:.0f} s (last state: {seen}); "
                                  "raise WaitPolicy.timeout_s or look at the pods: "
                                  f"kubectl get pods -n {job.namespace} -l {JOBSET_NAME_LABEL}={job.name}")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, policy.poll_max_s)


def _cleanup(job: _Job, policy: WaitPolicy, outcome: str, sink: Callable[[str], None]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        if policy.cleanup == "delete":
            job.delete()
            sink(f"[launcher] deleted {job.ref} ({outcome})")
            return
        patch: dict[str, Any] = {"metadata": {"labels": {OUTCOME_LABEL: outcome}}}
        if outcome in ("timeout", "interrupted", "error"):
            patch["spec"] = {"suspend": True}  # keep the object, free the GPUs
        job.patch(patch)
        sink(f"[launcher] labelled {job.ref} {OUTCOME_LABEL}={outcome}" + (" and suspended it" if "spec" in patch else ""))
    except ApiException as exc:
        if exc.status != 404:
            sink(f"[launcher] WARNING: could not {policy.cleanup} {job.ref}: {_short(exc)}; do it by hand")


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into an exception (so cleanup runs) while we wait; returns the restore function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_trainjob(spec: TrainJobSpec, api_client: Any, policy: WaitPolicy = WaitPolicy(),
                 sink: Callable[[str], None] = print) -> TrainJobResult:
    """Create the TrainJob, stream node-0's log to ``sink`` and wait for it to finish.

    Returns when the job is ``Complete``. Raises :class:`TrainJobFailed` (with the job's reason and
    message and the last log lines) when it fails, :class:`TrainJobTimeout` past
    ``policy.timeout_s``, :class:`LaunchError` when the API refuses. The job is deleted or labelled
    on every exit, as ``policy.cleanup`` says.
    """
    body = build_trainjob(spec)
    trainjob_schema.validate(body)
    job = _Job(api_client, spec.namespace, spec.name)
    started = time.monotonic()
    deadline = started + policy.timeout_s
    _create_or_adopt(job, body, sink)
    logs = _LogFollower(job.core, spec.namespace, spec.name, sink, poll_s=min(policy.poll_initial_s, 5.0))
    logs.start()
    restore = _raise_on_sigterm()
    outcome = "error"
    try:
        cond = _wait(job, policy, deadline, sink)
        outcome = "succeeded" if cond.type == "Complete" else "failed"
    except TrainJobTimeout:
        outcome = "timeout"
        raise
    except (_Terminated, KeyboardInterrupt) as exc:
        outcome = "interrupted"
        raise LaunchError(f"interrupted while waiting for {job.ref}") from exc
    finally:
        restore()
        if outcome in ("succeeded", "failed"):
            logs.finishing.set()
            logs.join(policy.log_grace_s)  # the containers have exited, so their log streams end
        logs.stop.set()
        _cleanup(job, policy, outcome, sink)
        logs.join(min(policy.log_grace_s, 2.0))
    tail = tuple(logs.tail)
    if cond.type == "Failed":
        last = "\n".join(tail[-15:]) or "(no log lines read)"
        raise TrainJobFailed(f"{job.ref} failed: {cond.reason}: {cond.message}\nlast node-0 log lines:\n{last}",
                             reason=cond.reason, detail=cond.message)
    return TrainJobResult(spec.name, spec.namespace, cond, time.monotonic() - started, tail)
