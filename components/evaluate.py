"""evaluate: base vs tuned on the held-out prompts, same seeds, every configured reward."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

from mixgrpo_pipelines.components.container_images import EVALUATOR_IMAGE


@dsl.component(base_image=EVALUATOR_IMAGE, install_kfp_package=False)
def evaluate(
    config_json: str,
    weights_uri: str,
    prompts_uri: str,
    metrics_uri: str,
    object_store_uri: str,
    pipeline_run_id: str,
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    images_per_prompt: int,
    max_prompts: int,
) -> NamedTuple("Evaluated", metrics_json=str, eval_uri=str, gate_value=float):
    """Score the base and tuned models on the held-out split with the same seeds; report with the image grid.

    Args:
        config_json: The training config overrides (from train).
        weights_uri: The tuned weights.
        prompts_uri: The prepared prompt data set (its test split is used).
        metrics_uri: The training metrics (for the reward curve).
        object_store_uri: Object-store root; the report goes to runs/RUN_ID/eval.
        pipeline_run_id: The KFP run id.
        metrics: Every evaluation metric (tuned, .base, .delta per reward; reward_normalized_mean).
        report_html: Table and side-by-side grid (base left, tuned right), images embedded.
        report_md: The same as Markdown.
        images_per_prompt: Images per held-out prompt.
        max_prompts: Evaluate at most this many held-out prompts; 0 = all.

    Returns:
        metrics_json: the metrics as JSON; eval_uri: the published report; gate_value: reward_normalized_mean of the tuned model.
    """
    import json
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from mixgrpo_pipelines.pipelines.steps import GATE_METRIC, RunLayout, eval_metrics, evaluate_step, markdown_report

    layout = RunLayout(object_store_uri, pipeline_run_id)
    out_dir = Path(tempfile.mkdtemp(prefix="mixgrpo-eval-out-"))
    try:
        result = evaluate_step(json.loads(config_json), weights_uri, prompts_uri, metrics_uri, layout.eval, out_dir,
                               images_per_prompt=images_per_prompt, max_prompts=max_prompts)
        values = eval_metrics(result)
        for name, value in values.items():
            metrics.log_metric(name, value)
        for artifact, text in ((report_html, (out_dir / "report.html").read_text()),
                               (report_md, markdown_report(out_dir, layout.eval))):
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            Path(artifact.path).write_text(text)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    from mixgrpo.console import say

    c = result.combined
    gap = f", {100 * c['gap_closed']:.0f}% of the gap closed" if c.get("gap_closed") is not None else ""
    say(f"combined {c['base']:.3f} -> {c['tuned']:.3f} (delta CI [{c['delta_ci95'][0]:+.3f}, {c['delta_ci95'][1]:+.3f}]{gap}), "
        f"{result.prompts} prompts x {result.images_per_prompt} seeds")
    outputs = namedtuple("Evaluated", ["metrics_json", "eval_uri", "gate_value"])
    return outputs(json.dumps(values, sort_keys=True), layout.eval, values[GATE_METRIC])
