"""prepare-prompts: read, clean, validate (great-expectations), split and publish the prompt data set."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def prepare_prompts(
    prompt_uri: str,
    object_store_uri: str,
    source_hash: str,
    validation_report: Output[Markdown],
    prompt_set: Output[Dataset],
    column: str,
    test_fraction: float,
    min_prompts: int,
    seed: int,
    model_uri: str,
    model_kind: str,
) -> NamedTuple("PreparedPrompts", prompts_uri=str, dataset_hash=str, n_train=int, n_test=int):
    """Prepare the prompt data set: clean, validate with great-expectations, split train / test, publish.

    Args:
        prompt_uri: Prompt file (txt / csv / jsonl / json / parquet), local path, file:// or s3://; "" = the toy world's prompts.
        object_store_uri: Object-store root (s3://BUCKET/PREFIX or file:///DIR); the data set goes to runs/RUN_ID/prompts.
        source_hash: sha256 of the prompt source (hash-prompts); with the settings it names the data set's prefix
            OBJECT_STORE/prompts/KEY, so the same data and settings land in the same place and the step's cache can hit.
        validation_report: The validation report (cleaning counts, every expectation, failing rows), also when it fails.
        prompt_set: The prepared data set as a Dataset artifact whose URI is the published prefix (lineage in the UI).
        column: Prompt column of csv / jsonl / parquet; "" = the first of prompt, caption, text.
        test_fraction: Share of prompts held out for evaluation.
        min_prompts: Fewer prompts after cleaning fail the validation suite.
        seed: Seed of the train / test split.
        model_uri: The base model; for model_kind=flux its text encoders precompute every prompt's embeddings once.
        model_kind: toy or flux.

    Returns:
        prompts_uri: The published data set (MANIFEST.json last); dataset_hash: its content hash; n_train / n_test: split sizes.
    """
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from mixgrpo_pipelines.pipelines.steps import prepare_step, prepared_prompts_uri

    output_uri = prepared_prompts_uri(object_store_uri, source_hash, column=column, test_fraction=test_fraction,
                                      min_prompts=min_prompts, seed=seed, model_uri=model_uri, model_kind=model_kind)
    report_dir = Path(tempfile.mkdtemp(prefix="prepare-report-"))
    try:
        out = prepare_step(prompt_uri, output_uri, report_dir, column=column, test_fraction=test_fraction,
                           min_prompts=min_prompts, seed=seed, model_uri=model_uri, model_kind=model_kind)
    finally:  # the report is an artifact pass or fail
        if (report_dir / "report.md").is_file():
            Path(validation_report.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(report_dir / "report.md", validation_report.path)
        shutil.rmtree(report_dir, ignore_errors=True)
    from mixgrpo.console import say

    say(f"{out.n_train} train / {out.n_test} held-out prompts, data set hash {out.dataset_hash[:12]}")
    prompt_set.uri = out.uri
    prompt_set.metadata.update({"dataset_hash": out.dataset_hash, "n_train": out.n_train, "n_test": out.n_test})
    outputs = namedtuple("PreparedPrompts", ["prompts_uri", "dataset_hash", "n_train", "n_test"])
    return outputs(out.uri, out.dataset_hash, out.n_train, out.n_test)
