"""A small in-process Kubernetes API emulator on 127.0.0.1 for the TrainJob launcher's tests.

Real HTTP (``http.server`` in a thread), so the real ``kubernetes`` client talks to it. It serves
only what ``mixgrpo.trainjob`` uses:

- TrainJobs (``trainer.kubeflow.org/v1alpha1``) in a namespace: create (409 if it exists), get,
  list, merge-patch, delete (which also deletes the job's pods and ends their log streams);
- pods: list by equality label selector; ``pods/{name}/log`` with ``follow=true`` streamed with
  chunked transfer encoding as lines appear.

A stand-in for the Trainer + JobSet controllers plays a :class:`Script` per created TrainJob:
``Created`` condition, one pod per node labelled like JobSet's pods, node-0 log lines one by one,
then ``Complete`` (succeed), ``Failed`` with a reason and message (fail), or nothing (hang, until
deleted). Every request is recorded in :attr:`K8sEmulator.requests` for assertions.

    with K8sEmulator() as k8s:
        k8s.script("my-job", Script(outcome="fail", logs=["step 1"], reason="JobSetFailed", message="OOM"))
        client = mixgrpo.trainjob.connect(k8s.host)
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")


@dataclass
class Script:
    """What the emulated controllers do with one TrainJob."""

    outcome: Literal["succeed", "fail", "hang"] = "succeed"
    logs: list[str] = field(default_factory=lambda: ["training..."])
    reason: str = "JobSetFailed"  # the Failed condition's reason / message
    message: str = "jobset failed: node-0 exited with code 1"
    start_delay_s: float = 0.05  # creation -> pods running
    line_delay_s: float = 0.01  # between log lines
    end_delay_s: float = 0.05  # last line -> terminal condition


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    content_type: str


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _go_bool(raw: str) -> bool:
    """Query booleans as the API server parses them (Go's strconv.ParseBool; the client sends 'True')."""
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"invalid boolean {raw!r}")


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


class K8sEmulator:
    """The API server, the store, and the scripted controllers."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.requests: list[Request] = []
        self.scripts: dict[str, Script] = {}
        self.default_script = Script()
        self.changed = threading.Condition()
        self.closed = False
        self._rv = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="k8s-emulator", daemon=True)

    # -- lifecycle
    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> K8sEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- scripting hooks
    def script(self, job_name: str, script: Script) -> None:
        """What happens to the TrainJob called ``job_name`` once it is created."""
        self.scripts[job_name] = script

    def requests_to(self, method: str, pattern: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and pattern in r.path]

    # -- store (callers hold self.changed)
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _set_condition(self, key: tuple[str, str], ctype: str, reason: str, message: str) -> None:
        job = self.jobs.get(key)
        if job is None:
            return
        conditions = job.setdefault("status", {}).setdefault("conditions", [])
        conditions.append({"type": ctype, "status": "True", "reason": reason, "message": message,
                           "lastTransitionTime": _now()})
        job["metadata"]["resourceVersion"] = self._next_rv()
        self.changed.notify_all()

    def create_job(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("metadata", {}).get("name", "")
        with self.changed:
            if (namespace, name) in self.jobs:
                return 409, _status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            job = copy.deepcopy(body)
            job["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                                   resourceVersion=self._next_rv(), generation=1)
            self.jobs[(namespace, name)] = job
        threading.Thread(target=self._play, args=(namespace, name, self.scripts.get(name, self.default_script)),
                         daemon=True).start()
        return 201, job

    def delete_job(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        with self.changed:
            job = self.jobs.pop((namespace, name), None)
            if job is None:
                return 404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found')
            for key in [k for k, p in self.pods.items() if p["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name]:
                del self.pods[key]
            self.changed.notify_all()
        return 200, _status(200, "", "") | {"status": "Success", "details": {"name": name, "kind": "trainjobs"}}

    # -- the emulated Trainer + JobSet controllers
    def _alive(self, key: tuple[str, str], uid: str) -> bool:
        job = self.jobs.get(key)
        return job is not None and job["metadata"]["uid"] == uid and not self.closed

    def _play(self, namespace: str, name: str, script: Script) -> None:
        key = (namespace, name)
        with self.changed:
            uid = self.jobs[key]["metadata"]["uid"]
            self._set_condition(key, "Created", "JobSetCreated", "JobSet is created")
        time.sleep(script.start_delay_s)
        with self.changed:
            if not self._alive(key, uid):
                return
            node0 = self._start_pods(namespace, name)
        for line in script.logs:
            time.sleep(script.line_delay_s)
            with self.changed:
                if not self._alive(key, uid):
                    return
                self.logs[(namespace, node0)].append(line)
                self.changed.notify_all()
        if script.outcome == "hang":
            return
        time.sleep(script.end_delay_s)
        with self.changed:
            if not self._alive(key, uid):
                return
            succeeded = script.outcome == "succeed"
            for pod in self.pods.values():
                if pod["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name:
                    pod["status"]["phase"] = "Succeeded" if succeeded else "Failed"
            if succeeded:
                self._set_condition(key, "Complete", "JobSetCompleted", "jobset completed successfully")
            else:
                self._set_condition(key, "Failed", script.reason, script.message)

    def _start_pods(self, namespace: str, name: str) -> str:
        job = self.jobs[(namespace, name)]
        trainer = job["spec"].get("trainer", {})
        extra: dict[str, str] = {}
        for patch in job["spec"].get("runtimePatches", []):
            for rjob in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
                extra.update(rjob.get("template", {}).get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}))
        for index in range(trainer.get("numNodes", 1)):
            pod_name = f"{name}-node-0-{index}-{uuid.uuid4().hex[:5]}"
            labels = {**extra, "jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                      "batch.kubernetes.io/job-completion-index": str(index)}
            self.pods[(namespace, pod_name)] = {
                "metadata": {"name": pod_name, "namespace": namespace, "uid": str(uuid.uuid4()), "labels": labels},
                "spec": {"containers": [{"name": "node", "image": trainer.get("image", "")}]},
                "status": {"phase": "Running"},
            }
            self.logs[(namespace, pod_name)] = []
            if index == 0:
                node0 = pod_name
        self.changed.notify_all()
        return node0


def _handler_for(k8s: K8sEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else None

        def _send(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            body = self._body() if method in ("POST", "PATCH", "PUT", "DELETE") else None
            k8s.requests.append(Request(method, url.path, query, body, self.headers.get("Content-Type", "")))
            if m := TRAINJOBS.match(url.path):
                return self._trainjobs(method, m.group(1), m.group(2), body)
            if (m := PODS.match(url.path)) and method == "GET":
                return self._pods(m.group(1), query.get("labelSelector", [""])[0])
            if (m := POD_LOG.match(url.path)) and method == "GET":
                return self._log(m.group(1), m.group(2), _go_bool(query.get("follow", ["false"])[0]))
            self._send(404, _status(404, "NotFound", f"the emulator does not serve {method} {url.path}"))

        def _trainjobs(self, method: str, namespace: str, name: str | None, body: Any) -> None:
            if name is None and method == "POST":
                return self._send(*k8s.create_job(namespace, body))
            if name is None and method == "GET":
                with k8s.changed:
                    items = [copy.deepcopy(j) for (ns, _), j in k8s.jobs.items() if ns == namespace]
                return self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                                        "metadata": {"resourceVersion": str(k8s._rv)}, "items": items})
            if name is not None and method == "DELETE":
                return self._send(*k8s.delete_job(namespace, name))
            with k8s.changed:
                job = k8s.jobs.get((namespace, name or ""))
                if job is None:
                    return self._send(404, _status(404, "NotFound", f'trainjobs.trainer.kubeflow.org "{name}" not found'))
                if method == "PATCH":
                    if self.headers.get("Content-Type") != "application/merge-patch+json":
                        return self._send(415, _status(415, "UnsupportedMediaType", "emulator supports merge-patch only"))
                    job.update(_merge_patch(job, body))
                    job["metadata"]["resourceVersion"] = k8s._next_rv()
                if method in ("GET", "PATCH"):
                    return self._send(200, copy.deepcopy(job))
            self._send(405, _status(405, "MethodNotAllowed", f"{method} not supported on a TrainJob"))

        def _pods(self, namespace: str, selector: str) -> None:
            with k8s.changed:
                items = [copy.deepcopy(p) for (ns, _), p in k8s.pods.items()
                         if ns == namespace and _matches(p["metadata"]["labels"], selector)]
            self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})

        def _log(self, namespace: str, pod: str, follow: bool) -> None:
            key = (namespace, pod)
            with k8s.changed:
                if key not in k8s.pods:
                    return self._send(404, _status(404, "NotFound", f'pods "{pod}" not found'))
                if not follow:
                    data = "".join(f"{line}\n" for line in k8s.logs[key]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            while True:
                with k8s.changed:
                    lines = k8s.logs.get(key, [])
                    new = lines[sent:]
                    pod_obj = k8s.pods.get(key)
                    done = k8s.closed or pod_obj is None or pod_obj["status"]["phase"] in ("Succeeded", "Failed")
                    if not new and not done:
                        k8s.changed.wait(0.5)
                        continue
                sent += len(new)
                if new:
                    chunk = "".join(f"{line}\n" for line in new).encode()
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
                if done and not new:
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PATCH(self) -> None:
            self._route("PATCH")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler
