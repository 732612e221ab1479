"""Strict validation of Kubeflow Trainer objects against the Trainer's published API models.

The models come from the ``kubeflow-trainer-api`` package (pydantic classes generated from the
Trainer's OpenAPI spec; installed with ``pip install 'mixgrpo[mlops]'``). Their ``from_dict`` checks
types and required fields but silently drops keys it does not know, so a misspelt field
(``numNode``) would vanish on a real cluster too: :func:`validate` also walks the object beside the
model's fields and reports every unknown key with its path.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

API_GROUP = "trainer.kubeflow.org"
API_VERSION = f"{API_GROUP}/v1alpha1"

_MODELS = {
    "TrainJob": "TrainerV1alpha1TrainJob",
    "ClusterTrainingRuntime": "TrainerV1alpha1ClusterTrainingRuntime",
    "TrainingRuntime": "TrainerV1alpha1TrainingRuntime",
}


class TrainerSchemaError(ValueError):
    """The object does not match the Trainer API models."""


def _model_class(kind: str) -> type:
    try:
        from kubeflow_trainer_api import models
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TrainerSchemaError(
            "the Trainer API models are not installed: pip install 'mixgrpo[mlops]' (kubeflow-trainer-api)"
        ) from exc
    if kind not in _MODELS:
        raise TrainerSchemaError(f"kind {kind!r} is not a Trainer kind; expected one of {sorted(_MODELS)}")
    return getattr(models, _MODELS[kind])


def _is_model(annotation: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unknown_keys(annotation: Any, value: Any, path: str) -> list[str]:
    """Paths of keys in ``value`` that the model type ``annotation`` does not declare."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _unknown_keys(inner[0], value, path) if len(inner) == 1 else []
    if origin is list and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _unknown_keys(args[0], item, f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [p for key, item in value.items() for p in _unknown_keys(args[1], item, f"{path}.{key}")]
    if not _is_model(annotation) or not isinstance(value, dict) or "actual_instance" in annotation.model_fields:
        return []  # a leaf: scalar, Any, or a oneOf wrapper (quantity, int-or-string)
    fields = {info.alias or name: info.annotation for name, info in annotation.model_fields.items()}
    found: list[str] = []
    for key, item in value.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        else:
            found.extend(_unknown_keys(fields[key], item, f"{path}.{key}"))
    return found


def validate(obj: dict[str, Any]) -> None:
    """Raise :class:`TrainerSchemaError` unless ``obj`` is a valid Trainer object of its ``kind``.

    Checks apiVersion, types and required fields (the model's own validation) and rejects any key
    the model does not declare.
    """
    from pydantic import ValidationError

    kind = obj.get("kind", "")
    model = _model_class(kind)
    where = f"{kind} {obj.get('metadata', {}).get('name', '?')}"
    if obj.get("apiVersion") != API_VERSION:
        raise TrainerSchemaError(f"{where}: apiVersion must be {API_VERSION!r}, got {obj.get('apiVersion')!r}")
    unknown = _unknown_keys(model, obj, "")
    if unknown:
        raise TrainerSchemaError(f"{where}: fields unknown to the Trainer API: {', '.join(p.lstrip('.') for p in unknown)}")
    try:
        model.from_dict(obj)
    except (ValidationError, ValueError) as exc:
        raise TrainerSchemaError(f"{where} does not match the Trainer API models: {exc}") from exc
