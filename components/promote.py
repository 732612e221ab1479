"""promote: move the champion alias to the new version when the gate says it wins."""

from kfp import dsl

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def promote(
    version: str,
    mlflow_tracking_uri: str,
    model_name: str,
    gate_metric: str,
    gate_margin: float,
) -> str:
    """Move `champion` to the version when its gate metric beats the champion's by the margin (no champion: promote).

    The decision is made again here (the champion may have moved since register); the old champion is tagged demoted_by.

    Args:
        version: The candidate model version.
        mlflow_tracking_uri: MLflow tracking server; "" = $MLFLOW_TRACKING_URI.
        model_name: Registered model name.
        gate_metric: Metric compared.
        gate_margin: Required improvement.

    Returns:
        The decision as JSON.
    """
    import json

    from mixgrpo_pipelines.pipelines.steps import promote_step

    decision = promote_step(tracking_uri=mlflow_tracking_uri, model_name=model_name, version=version,
                            gate_metric=gate_metric, gate_margin=gate_margin)
    from mixgrpo.console import say

    say(f"promotion of {model_name} version {version}: {decision['reason']}")
    return json.dumps(decision, sort_keys=True)
