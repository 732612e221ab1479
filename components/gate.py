"""gate: the promotion gate, read-only; its boolean output drives the pipeline's dsl.If around promote."""

from kfp import dsl

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def gate(
    version: str,
    mlflow_tracking_uri: str,
    model_name: str,
    gate_metric: str,
    gate_margin: float,
) -> bool:
    """Decide whether the version should become `champion`: no champion yet, or its metric beats the champion's by the margin.

    Args:
        version: The candidate model version.
        mlflow_tracking_uri: MLflow tracking server; "" = $MLFLOW_TRACKING_URI.
        model_name: Registered model name.
        gate_metric: Metric compared (a metric.NAME tag of both versions).
        gate_margin: Required improvement over the champion.

    Returns:
        True when promote should run.
    """
    from mixgrpo_pipelines.pipelines.steps import gate_step

    decision = gate_step(tracking_uri=mlflow_tracking_uri, model_name=model_name, version=version,
                         gate_metric=gate_metric, gate_margin=gate_margin)
    from mixgrpo.console import say

    say(f"gate for {model_name} version {version}: {'promote' if decision.promote else 'keep'} ({decision.reason})")
    return decision.promote
