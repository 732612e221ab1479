"""``mixgrpo pipeline compile | submit | schedule``: the pipeline YAML and a Kubeflow Pipelines cluster.

* compile: write ``pipelines/mixgrpo_pipeline.yaml`` (committed; a test fails when it is stale).
  The committed file references the images tagged ``v<package version>``
  (``CANONICAL_IMAGE_TAG``) so it does not change with every commit; ``--image-tag`` (default for
  submit / schedule: the git commit) compiles for the images CI built from this commit.
* submit: compile, upload a pipeline version named by the git sha (``<sha>``, or ``<sha>-N`` when
  that name is taken), start a run, print its URL.
* schedule: the same, but a recurring run (cron).

Host: ``--host`` or ``$KFP_HOST``; token: ``--token-file`` or ``$KFP_TOKEN`` (else kfp.Client's own
credential discovery, e.g. in-cluster service-account tokens). ``--token VALUE`` still works but is
deprecated (the value shows in the process list). A token is only sent over https, or plain http
to loopback (``mixgrpo.transport``); an unreachable host is a one-line error within
``CONNECT_TIMEOUT_S``. Every run uses the ServiceAccount
``mixgrpo-launcher`` (``--service-account``): the train step creates TrainJobs with it.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PIPELINE_YAML = Path(__file__).resolve().parent / "mixgrpo_pipeline.yaml"  # package data


def canonical_image_tag() -> str:
    from mixgrpo import __version__

    return f"v{__version__}"


def compile_pipeline(output: str | Path = PIPELINE_YAML, *, image_tag: str | None = None,
                     registry: str | None = None) -> Path:
    """Compile the DAG to ``output`` in a fresh interpreter (image references are resolved at import)."""
    from mixgrpo.container_images import REGISTRY_ENV, TAG_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXGRPO_IMAGE_")}
    env[TAG_ENV] = image_tag or canonical_image_tag()
    if registry:
        env[REGISTRY_ENV] = registry
    code = ("import sys; from kfp import compiler; from mixgrpo_pipelines.pipelines.mixgrpo_pipeline import mixgrpo_pipeline; "
            "compiler.Compiler().compile(mixgrpo_pipeline, sys.argv[1])")
    output = Path(output).resolve()
    subprocess.run([sys.executable, "-c", code, str(output)], env=env, check=True)
    return output


def git_sha() -> str:
    from mixgrpo.container_images import git_sha as sha

    value = os.environ.get("GITHUB_SHA", "")[:12] or sha(PIPELINE_YAML.parent)
    if not value:
        raise RuntimeError("no git commit: run inside the checkout or set GITHUB_SHA")
    return value


CONNECT_TIMEOUT_S = 5.0


def read_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The bearer token: ``--token-file``, else the deprecated ``--token`` value, else ``$KFP_TOKEN``."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"--token-file {path} does not exist")
        return path.read_text().strip() or None
    if token:
        print("mixgrpo: warning: --token is deprecated: its value shows in the process list; "
              "set $KFP_TOKEN or pass --token-file instead", file=sys.stderr)
        return token
    return os.environ.get("KFP_TOKEN") or None


def check_reachable(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to ``url``'s host and port; a clear error when nobody answers."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"cannot reach the Kubeflow Pipelines API at {url} ({parts.hostname}:{port}: "
                              f"{error.strerror or error}); check --host / $KFP_HOST and that the API is up "
                              "(e.g. kubectl port-forward svc/ml-pipeline-ui 8080:80)") from None


def client(host: str | None = None, token: str | None = None, namespace: str | None = None,
           token_file: str | None = None) -> Any:
    import kfp

    from mixgrpo.transport import check_secret_transport

    host = host or os.environ.get("KFP_HOST")
    if not host:
        raise ValueError("no Kubeflow Pipelines host: pass --host or set KFP_HOST (e.g. https://kubeflow.example.com/pipeline)")
    token = read_token(token, token_file)
    if token:
        check_secret_transport(host if "://" in host else f"http://{host}", "the bearer token")
    check_reachable(host)
    return kfp.Client(host=host, existing_token=token, namespace=namespace or os.environ.get("KFP_NAMESPACE"))


def upload_version(kfp_client: Any, package: Path, version_name: str, pipeline_name: str = "mixgrpo") -> tuple[str, str]:
    """Upload ``package`` as version ``version_name`` of ``pipeline_name`` (created if missing); (pipeline_id, version_id)."""
    pipeline_id = kfp_client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = kfp_client.upload_pipeline(str(package), pipeline_name=pipeline_name,
                                              description="MixGRPO training pipeline")
        pipeline_id = pipeline.pipeline_id  # with a default version; ours is added beside it
    existing = {v.display_name for v in (kfp_client.list_pipeline_versions(pipeline_id, page_size=200).pipeline_versions or [])}
    name, n = version_name, 1
    while name in existing:
        n += 1
        name = f"{version_name}-{n}"
    version = kfp_client.upload_pipeline_version(str(package), pipeline_version_name=name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def submit(args: Any, *, recurring: bool = False) -> int:
    """``mixgrpo pipeline submit`` / ``schedule``."""
    from mixgrpo_pipelines.pipelines.local import parse_params

    sha = args.git_sha or git_sha()
    params = parse_params(list(args.param or []))
    params.setdefault("git_sha", sha)
    kfp_client = client(args.host, args.token, args.namespace, getattr(args, "token_file", None))
    with tempfile.TemporaryDirectory(prefix="mixgrpo-compile-") as tmp:
        package = compile_pipeline(Path(tmp) / "mixgrpo_pipeline.yaml", image_tag=args.image_tag or sha,
                                   registry=args.registry or os.environ.get("MIXGRPO_IMAGE_REGISTRY"))
        pipeline_id, version_id = upload_version(kfp_client, package, sha, args.pipeline_name)
    experiment = kfp_client.create_experiment(args.experiment, namespace=args.namespace)
    host = kfp_client._get_url_prefix()  # kfp.Client builds its own links the same way
    if recurring:
        job = kfp_client.create_recurring_run(
            experiment_id=experiment.experiment_id, job_name=f"mixgrpo-{sha}", cron_expression=args.cron,
            params=params, pipeline_id=pipeline_id, version_id=version_id, enable_caching=False,
            service_account=args.service_account, max_concurrency=1, no_catchup=True)
        print(f"recurring run {job.recurring_run_id} ({args.cron}) of pipeline version {sha}: "
              f"{host}/#/recurringrun/details/{job.recurring_run_id}")
        return 0
    run = kfp_client.run_pipeline(experiment_id=experiment.experiment_id, job_name=f"mixgrpo-{sha}", params=params,
                                  pipeline_id=pipeline_id, version_id=version_id, enable_caching=False,
                                  service_account=args.service_account)
    print(f"run {run.run_id} of pipeline version {sha}: {host}/#/runs/details/{run.run_id}")
    if args.wait:
        result = kfp_client.wait_for_run_completion(run.run_id, timeout=args.wait)
        print(f"run {run.run_id} finished: {result.state}")
        return 0 if str(result.state).upper() == "SUCCEEDED" else 1
    return 0


def main(args: Any) -> int:
    """Dispatch ``mixgrpo pipeline ACTION``."""
    if args.action == "compile":
        path = compile_pipeline(args.output or PIPELINE_YAML, image_tag=args.image_tag, registry=args.registry)
        print(f"wrote {path}")
        return 0
    return submit(args, recurring=args.action == "schedule")
