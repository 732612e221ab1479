"""MLflow model registry: register trained weights, decide and apply promotions, log runs.

* :func:`register_model` creates a registered-model version whose ``source`` is the S3 (or
  ``file://``) URI of the weights (nothing is copied), tagged with the git sha, pipeline run id,
  config hash, dataset manifest hash and every evaluation metric (``metric.<name>``), and points
  the alias ``challenger`` at it. A retry with the same pipeline run id returns the version it
  created before instead of creating another.
* :func:`decide_promotion` compares the candidate's gate metric with the ``champion``'s;
  :func:`promote` moves the ``champion`` alias and tags both versions. Only aliases are used,
  never the deprecated stages.
* :func:`log_training_run` puts metrics, metric curves, parameters and files (plots, image
  grid) into an MLflow run, once per pipeline run.

Every function takes the ``MlflowClient`` (see :meth:`RegistrySettings.connect`) so tests and
the pipeline use the same code against a real server or a local sqlite store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from mixgrpo.transport import is_loopback as _is_loopback

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "mixgrpo-dit"
DEFAULT_GATE_METRIC = "reward_normalized_mean"  # evaluate's mean of normalised rewards (tuned model)
CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_PIPELINE_RUN = "pipeline_run_id"
TAG_GIT_SHA = "git_sha"
TAG_CONFIG_HASH = "config_hash"
TAG_DATASET_HASH = "dataset_manifest_hash"
TAG_WEIGHTS_URI = "weights_uri"
METRIC_TAG_PREFIX = "metric."
TAG_PREVIOUS_CHAMPION = "previous_champion"
TAG_DEMOTED_BY = "demoted_by"
TAG_PROMOTION_REASON = "promotion_reason"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,249}")
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/ ]{1,250}")


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the tracking URI, model and version."""


# MLflow's HTTP client retries 7 times with 2 s-doubling backoff and a 120 s timeout (minutes when the
# server dies mid-request); a pipeline step uses these bounds instead: ~3 tries within ~30 s at most.
MLFLOW_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
}


@contextmanager
def bounded_mlflow_http() -> Iterator[None]:
    """Apply :data:`MLFLOW_HTTP_LIMITS` for the duration (values already set in the environment win)."""
    added = {k: v for k, v in MLFLOW_HTTP_LIMITS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# --------------------------------------------------------------------------- settings and connection


@dataclass(frozen=True)
class RegistrySettings:
    """Where the registry is and what the model is called, resolved once (see :meth:`from_env`)."""

    tracking_uri: str  # http(s)://host:port of a server, or sqlite:///ABS/mlflow.db (embedded default)
    model_name: str = DEFAULT_MODEL_NAME
    token: str | None = field(default=None, repr=False)  # bearer token (MLFLOW_TRACKING_TOKEN)
    artifact_location: str | None = None  # for experiments log_training_run creates; None: the store's default
    timeout_s: float = 5.0  # reachability check

    def __post_init__(self) -> None:
        scheme = urlparse(self.tracking_uri).scheme
        if scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "file", "databricks"):
            raise RegistryError(f"MLflow tracking URI {self.tracking_uri!r} is not supported: use "
                                "http(s)://HOST:PORT or sqlite:///ABSOLUTE/PATH/mlflow.db")
        if not _KEY_RE.fullmatch(self.model_name):
            raise RegistryError(f"registered model name {self.model_name!r}: use letters, digits, '_', '-', '.', '/'")
        if self.token and scheme == "http" and not _is_loopback(urlparse(self.tracking_uri).hostname or ""):
            raise RegistryError(f"refusing to send an MLflow token over plain http to {self.tracking_uri}: "
                                "use https, or a loopback address for a local server")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, tracking_uri: str | None = None,
                 model_name: str | None = None) -> RegistrySettings:
        """Tracking URI: the argument, else MLFLOW_TRACKING_URI, else ``sqlite:///$PWD/mlflow.db``.

        Token: MLFLOW_TRACKING_TOKEN (or a basic-auth MLFLOW_TRACKING_PASSWORD, which gets the
        same plain-http check). Model name: the argument, else MIXGRPO_MODEL_NAME, else
        ``mixgrpo-dit``. The embedded sqlite default keeps artifacts beside the database.
        """
        env = dict(os.environ if environ is None else environ)
        uri = tracking_uri or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").resolve().as_uri()
        return cls(
            tracking_uri=uri,
            model_name=model_name or env.get("MIXGRPO_MODEL_NAME") or DEFAULT_MODEL_NAME,
            token=env.get(TOKEN_ENV) or env.get(PASSWORD_ENV) or None,
            artifact_location=artifacts,
        )

    def connect(self) -> MlflowClient:
        """An ``MlflowClient`` for this URI, after checking that the store answers."""
        from mlflow import MlflowClient

        check_reachable(self)
        if self.token and os.environ.get(TOKEN_ENV) != self.token and not os.environ.get(PASSWORD_ENV):
            os.environ[TOKEN_ENV] = self.token  # MLflow's REST client reads credentials from the environment
        with _mlflow_errors(self.tracking_uri, "open the tracking store"):
            return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)


def check_reachable(settings: RegistrySettings) -> None:
    """Fail fast (within ``timeout_s``) with a clear error when the tracking store cannot be used.

    For a server: one registry search over the REST API (checks the token too). For sqlite: the
    database's directory must exist or be creatable.
    """
    parsed = urlparse(settings.tracking_uri)
    if parsed.scheme == "sqlite":
        path = Path(settings.tracking_uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the directory of MLflow database {settings.tracking_uri}: "
                                f"{exc}") from exc
        return
    if parsed.scheme not in ("http", "https"):
        return
    url = settings.tracking_uri.rstrip("/") + "/api/2.0/mlflow/registered-models/search?max_results=1"
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        hint = "check MLFLOW_TRACKING_TOKEN" if exc.code in (401, 403) else "is this an MLflow tracking server?"
        raise RegistryError(f"MLflow at {settings.tracking_uri} answered HTTP {exc.code} to a registry search: "
                            f"{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(f"MLflow tracking server {settings.tracking_uri} is unreachable ({reason}): start it, "
                            "or fix the tracking URI (MLFLOW_TRACKING_URI); nothing was registered") from exc


@contextmanager
def _mlflow_errors(where: str, action: str) -> Iterator[None]:
    """Turn MLflow / HTTP failures into a RegistryError naming the tracking URI and the action."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {where}: could not {action}: {exc.message}") from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RegistryError(f"MLflow at {where} is unreachable while trying to {action}: {exc}") from exc


def _where(client: MlflowClient) -> str:
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


def _preflight(client: MlflowClient) -> None:
    """check_reachable for the client's store, so a dead server fails in seconds, not after MLflow's retries."""
    check_reachable(RegistrySettings(tracking_uri=_where(client), token=os.environ.get(TOKEN_ENV) or None))


# --------------------------------------------------------------------------- register


def version_tags(
    *, pipeline_run_id: str, weights_uri: str, git_sha: str = "", config_hash: str = "", dataset_hash: str = "",
    metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The tags :func:`register_model` puts on a version (metrics as ``metric.<name>``, repr of the float)."""
    out = {TAG_PIPELINE_RUN: pipeline_run_id, TAG_WEIGHTS_URI: weights_uri}
    out.update({k: v for k, v in ((TAG_GIT_SHA, git_sha), (TAG_CONFIG_HASH, config_hash),
                                  (TAG_DATASET_HASH, dataset_hash)) if v})
    for name, value in (metrics or {}).items():
        if not _KEY_RE.fullmatch(name):
            raise RegistryError(f"metric name {name!r} cannot be a tag key: use letters, digits, '_', '-', '.', '/'")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RegistryError(f"metric {name!r} is {value!r}; expected a number")
        out[METRIC_TAG_PREFIX + name] = repr(float(value))
    for key, value in (tags or {}).items():
        if not _KEY_RE.fullmatch(key):
            raise RegistryError(f"tag key {key!r}: use letters, digits, '_', '-', '.', '/', ' '")
        out[key] = str(value)
    return out


def find_version(client: MlflowClient, name: str, pipeline_run_id: str) -> ModelVersion | None:
    """The version registered by pipeline run ``pipeline_run_id``, if any (the oldest if several)."""
    _check_id(pipeline_run_id)
    with _mlflow_errors(_where(client), f"search versions of {name!r}"):
        found = client.search_model_versions(f"name='{name}' and tags.{TAG_PIPELINE_RUN}='{pipeline_run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_model(
    client: MlflowClient,
    name: str,
    weights_uri: str,
    *,
    pipeline_run_id: str,
    git_sha: str = "",
    config_hash: str = "",
    dataset_hash: str = "",
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    mlflow_run_id: str | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Register ``weights_uri`` as a new version of ``name`` (source = the URI, no copy), alias ``challenger``.

    Idempotent on ``pipeline_run_id``: when a version with that tag exists it is returned (its
    alias re-applied) and nothing is created. Inputs are checked and the registry is searched
    before anything is written, so a failure leaves nothing half-registered.
    """
    with bounded_mlflow_http():
        return _register_model(client, name, weights_uri, pipeline_run_id=pipeline_run_id, git_sha=git_sha,
                               config_hash=config_hash, dataset_hash=dataset_hash, metrics=metrics, tags=tags,
                               mlflow_run_id=mlflow_run_id, description=description)


def _register_model(client: MlflowClient, name: str, weights_uri: str, *, pipeline_run_id: str, git_sha: str,
                    config_hash: str, dataset_hash: str, metrics: Mapping[str, float] | None,
                    tags: Mapping[str, str] | None, mlflow_run_id: str | None, description: str | None) -> ModelVersion:
    _check_id(pipeline_run_id)
    _check_weights_uri(weights_uri)
    all_tags = version_tags(pipeline_run_id=pipeline_run_id, weights_uri=weights_uri, git_sha=git_sha,
                            config_hash=config_hash, dataset_hash=dataset_hash, metrics=metrics, tags=tags)
    where = _where(client)
    _preflight(client)
    existing = find_version(client, name, pipeline_run_id)
    if existing is not None:
        if existing.source != weights_uri:
            raise RegistryError(f"pipeline run {pipeline_run_id} already registered {name} version "
                                f"{existing.version} with source {existing.source}, not {weights_uri}: "
                                "a retry must register the same weights; use a new pipeline run id")
        log.info("pipeline run %s already registered %s version %s; reusing it", pipeline_run_id, name,
                 existing.version)
        version = existing
    else:
        _ensure_registered_model(client, name)
        try:
            with _mlflow_errors(where, f"create a version of {name!r} from {weights_uri}"):
                version = client.create_model_version(name, weights_uri, run_id=mlflow_run_id, tags=all_tags,
                                                      description=description, await_creation_for=60)
        except RegistryError as error:  # the response may be lost after the server created the version
            try:
                version = find_version(client, name, pipeline_run_id)
            except RegistryError:
                version = None
            if version is None:
                raise error from error.__cause__
            log.warning("creating a version of %s failed (%s), but pipeline run %s's version %s exists: using it",
                        name, error, pipeline_run_id, version.version)
        log.info("registered %s version %s from %s", name, version.version, weights_uri)
    version = settle_duplicates(client, name, pipeline_run_id)
    with _mlflow_errors(where, f"set alias {CHALLENGER!r} on {name} version {version.version}"):
        client.set_registered_model_alias(name, CHALLENGER, str(version.version))
        return client.get_model_version(name, str(version.version))


def settle_duplicates(client: MlflowClient, name: str, pipeline_run_id: str) -> ModelVersion:
    """The one version of pipeline run ``pipeline_run_id``; any other with its tag is deleted.

    A lost create-model-version response makes MLflow's client send the POST again, so one run
    can own several versions. The one kept is the version ``challenger`` already points to when
    it is among them (a retry never moves the alias), else the oldest.
    """
    with _mlflow_errors(_where(client), f"search versions of {name!r}"):
        found = client.search_model_versions(f"name='{name}' and tags.{TAG_PIPELINE_RUN}='{pipeline_run_id}'")
    if not found:
        raise RegistryError(f"MLflow at {_where(client)}: no version of {name} is tagged {TAG_PIPELINE_RUN}="
                            f"{pipeline_run_id} after creating one; check the registry")
    current = alias_version(client, name, CHALLENGER)
    keep = next((v for v in found if str(v.version) == current), None) or min(found, key=lambda v: int(v.version))
    for duplicate in found:
        if str(duplicate.version) != str(keep.version):
            with _mlflow_errors(_where(client), f"delete duplicate {name} version {duplicate.version}"):
                client.delete_model_version(name, str(duplicate.version))
            log.warning("deleted %s version %s: a duplicate of version %s for pipeline run %s (a retried request)",
                        name, duplicate.version, keep.version, pipeline_run_id)
    return keep


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    with _mlflow_errors(_where(client), f"create registered model {name!r}"):
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                client.create_registered_model(name, description="MixGRPO-tuned flow transformer weights")
            except MlflowException as race:
                if race.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise


def _check_id(pipeline_run_id: str) -> None:
    if not isinstance(pipeline_run_id, str) or not _ID_RE.fullmatch(pipeline_run_id):
        raise RegistryError(f"pipeline run id {pipeline_run_id!r}: use letters, digits and ._:/- (a KFP run id)")


def _check_weights_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    if scheme not in ("s3", "file", "gs", "https", "hdfs") or not urlparse(uri).path.strip("/"):
        raise RegistryError(f"weights URI {uri!r} is not an object-store URI: use s3://BUCKET/PREFIX "
                            "(or file:///ABS/DIR for the embedded default)")


# --------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict: promote ``candidate_version`` to ``champion`` or not, and why."""

    promote: bool
    reason: str
    metric: str
    margin: float
    candidate_version: str
    candidate_value: float
    champion_version: str | None = None  # None: no champion yet
    champion_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None."""
    with _mlflow_errors(_where(client), f"read the aliases of {name!r}"):
        aliases = client.get_registered_model(name).aliases
    version = aliases.get(alias)
    return None if version is None else str(version)


def metric_of(version: ModelVersion, metric: str) -> float:
    """The ``metric.<metric>`` tag of a version as a float; RegistryError naming the tags present."""
    raw = version.tags.get(METRIC_TAG_PREFIX + metric)
    if raw is None:
        present = sorted(k.removeprefix(METRIC_TAG_PREFIX) for k in version.tags if k.startswith(METRIC_TAG_PREFIX))
        raise RegistryError(f"{version.name} version {version.version} has no tag {METRIC_TAG_PREFIX}{metric}; "
                            f"its metrics: {present or 'none'}: choose one of them as the gate metric")
    return float(raw)


def decide_promotion(client: MlflowClient, name: str, candidate_version: str | int,
                     metric: str = DEFAULT_GATE_METRIC, margin: float = 0.0) -> PromotionDecision:
    """Promote when there is no champion, or when the candidate's ``metric`` > champion's + ``margin``."""
    if not math.isfinite(margin) or margin < 0:
        raise RegistryError(f"promotion margin {margin}: use a finite number >= 0")
    with _mlflow_errors(_where(client), f"read {name} version {candidate_version}"):
        candidate = client.get_model_version(name, str(candidate_version))
    value = metric_of(candidate, metric)
    base = dict(metric=metric, margin=margin, candidate_version=str(candidate.version), candidate_value=value)
    if not math.isfinite(value):
        return PromotionDecision(False, f"candidate's {metric} is {value}", **base)
    champion_version = alias_version(client, name, CHAMPION)
    if champion_version is None:
        return PromotionDecision(True, f"no {CHAMPION} yet", **base)
    with _mlflow_errors(_where(client), f"read {name} version {champion_version}"):
        champion = client.get_model_version(name, champion_version)
    best = metric_of(champion, metric)
    base.update(champion_version=champion_version, champion_value=best)
    if champion_version == str(candidate.version):
        return PromotionDecision(False, f"version {champion_version} is already {CHAMPION}", **base)
    if value > best + margin:
        return PromotionDecision(True, f"{metric} {value:.6g} > {CHAMPION} v{champion_version}'s {best:.6g} "
                                       f"+ margin {margin:g}", **base)
    return PromotionDecision(False, f"{metric} {value:.6g} <= {CHAMPION} v{champion_version}'s {best:.6g} "
                                    f"+ margin {margin:g}", **base)


def promote(client: MlflowClient, name: str, version: str | int, decision: PromotionDecision) -> ModelVersion:
    """Move ``champion`` to ``version`` as ``decision`` allows; tag the old and new champions.

    The new version gets ``previous_champion``, the old one ``demoted_by``. Idempotent: when
    ``version`` is already champion the tags are completed and nothing moves. Refuses when the
    decision is negative, is about another version, or the champion moved since it was made.
    """
    with bounded_mlflow_http():
        return _promote(client, name, str(version), decision)


def _promote(client: MlflowClient, name: str, version: str, decision: PromotionDecision) -> ModelVersion:
    where = _where(client)
    if not decision.promote:
        raise RegistryError(f"not promoting {name} version {version}: the gate decided against it ({decision.reason})")
    if decision.candidate_version != version:
        raise RegistryError(f"the promotion decision is for {name} version {decision.candidate_version}, "
                            f"not {version}: run decide_promotion for version {version}")
    current = alias_version(client, name, CHAMPION)
    if current not in (version, decision.champion_version):
        raise RegistryError(f"{CHAMPION} of {name} moved to version {current} after the decision (made against "
                            f"{decision.champion_version}): run decide_promotion again")
    old = decision.champion_version
    with _mlflow_errors(where, f"move {CHAMPION!r} of {name} to version {version}"):
        client.set_model_version_tag(name, version, TAG_PROMOTION_REASON, decision.reason)
        if old is not None:
            client.set_model_version_tag(name, version, TAG_PREVIOUS_CHAMPION, old)
        if current != version:
            client.set_registered_model_alias(name, CHAMPION, version)
        if old is not None:
            client.set_model_version_tag(name, old, TAG_DEMOTED_BY, version)
        log.info("%s version %s is %s (was %s): %s", name, version, CHAMPION, old, decision.reason)
        return client.get_model_version(name, version)


# --------------------------------------------------------------------------- runs


def log_training_run(
    client: MlflowClient,
    experiment: str,
    *,
    pipeline_run_id: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    history: Mapping[str, Sequence[float]] | None = None,
    artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
    tags: Mapping[str, str] | None = None,
    artifact_location: str | None = None,
) -> str:
    """Log one pipeline run's training / evaluation into an MLflow run; returns its run id.

    ``metrics``: final values; ``history``: name -> value per step (reward curves); ``artifacts``:
    artifact sub-directory -> local file or directory (plots, image grid, report). Idempotent:
    a finished run tagged with ``pipeline_run_id`` is returned as is; an unfinished one (a crash
    mid-logging) is deleted and logged again.
    """
    from mlflow.entities import Metric, Param

    _check_id(pipeline_run_id)
    where = _where(client)
    _preflight(client)
    for sub, path in (artifacts or {}).items():
        if not Path(path).exists():
            raise RegistryError(f"artifact {sub!r}: local path {path} does not exist")
    with _mlflow_errors(where, f"log the run of pipeline run {pipeline_run_id} in experiment {experiment!r}"):
        experiment_id = _experiment_id(client, experiment, artifact_location)
        for run in client.search_runs([experiment_id], f"tags.{TAG_PIPELINE_RUN} = '{pipeline_run_id}'"):
            if run.info.status == "FINISHED":
                log.info("pipeline run %s already logged as MLflow run %s", pipeline_run_id, run.info.run_id)
                return run.info.run_id
            client.delete_run(run.info.run_id)
        run = client.create_run(experiment_id, run_name=run_name, tags={TAG_PIPELINE_RUN: pipeline_run_id,
                                                                         **(tags or {})})
        run_id = run.info.run_id
        timestamp = run.info.start_time
        entries = [Metric(k, float(v), timestamp, 0) for k, v in (metrics or {}).items()]
        entries += [Metric(k, float(v), timestamp, step) for k, values in (history or {}).items()
                    for step, v in enumerate(values)]
        param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for start in range(0, len(entries), 1000):  # MLflow's per-request limits: 1000 metrics, 100 params
            client.log_batch(run_id, metrics=entries[start : start + 1000])
        for start in range(0, len(param_list), 100):
            client.log_batch(run_id, params=param_list[start : start + 100])
        _log_artifacts(client, run_id, artifacts or {})
        client.set_terminated(run_id, "FINISHED")
    return run_id


def pipeline_run(client: MlflowClient, experiment: str, *, pipeline_run_id: str, run_name: str | None = None,
                 tags: Mapping[str, str] | None = None, artifact_location: str | None = None) -> str:
    """The MLflow run of pipeline run ``pipeline_run_id`` (tagged with it): the existing one (a retried
    step), else a new one. The training step creates it and logs into it live; evaluation and
    registration attach to it (:func:`attach_to_run`); the model version links to it."""
    _check_id(pipeline_run_id)
    _preflight(client)
    with _mlflow_errors(_where(client), f"find or create the run of pipeline run {pipeline_run_id}"):
        experiment_id = _experiment_id(client, experiment, artifact_location)
        found = client.search_runs([experiment_id], f"tags.{TAG_PIPELINE_RUN} = '{pipeline_run_id}'")
        if found:
            return min(found, key=lambda r: r.info.start_time).info.run_id
        run = client.create_run(experiment_id, run_name=run_name, tags={TAG_PIPELINE_RUN: pipeline_run_id, **(tags or {})})
        return run.info.run_id


def attach_to_run(client: MlflowClient, run_id: str, *, metrics: Mapping[str, float] | None = None, step: int = 0,
                  artifacts: Mapping[str, str | os.PathLike[str]] | None = None,
                  tags: Mapping[str, str] | None = None) -> str:
    """Add ``metrics`` (at ``step``), ``artifacts`` (sub-directory -> local path) and ``tags`` to an existing
    run, then mark it finished. Re-running it overwrites the artifacts and adds the same metric points."""
    from mlflow.entities import Metric, RunTag

    where = _where(client)
    with _mlflow_errors(where, f"attach to MLflow run {run_id}"):
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if math.isfinite(float(v))]
        for start in range(0, len(entries), 1000):
            client.log_batch(run_id, metrics=entries[start:start + 1000])
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        _log_artifacts(client, run_id, artifacts or {})
        client.set_terminated(run_id, "FINISHED")
    return run_id


def _log_artifacts(client: MlflowClient, run_id: str, artifacts: Mapping[str, str | os.PathLike[str]]) -> None:
    """Upload each local file or folder under its sub-directory of the run's artifacts ("" = the root)."""
    for sub, path in artifacts.items():
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=sub or None)
        else:
            client.log_artifact(run_id, str(path), artifact_path=sub or None)


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


__all__ = [
    "RegistryError", "RegistrySettings", "PromotionDecision", "check_reachable", "version_tags", "find_version",
    "register_model", "settle_duplicates", "bounded_mlflow_http", "alias_version", "metric_of", "decide_promotion", "promote", "log_training_run",
    "pipeline_run", "attach_to_run",
    "DEFAULT_MODEL_NAME", "DEFAULT_GATE_METRIC", "CHALLENGER", "CHAMPION",
]
