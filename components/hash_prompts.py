"""hash-prompts: the sha256 of the prompt source's bytes, the key prepare-prompts is cached on."""

from kfp import dsl

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def hash_prompts(prompt_uri: str) -> str:
    """Read the prompt source and return the sha256 of its bytes (never cached: the data behind a URI changes).

    Args:
        prompt_uri: Prompt file at s3://, file:// or a path; "" = the toy world's prompts.

    Returns:
        The sha256 (hex) of the source's bytes.
    """
    from mixgrpo.console import say
    from mixgrpo_pipelines.pipelines.steps import prompt_source_hash

    digest = prompt_source_hash(prompt_uri)
    say(f"prompt source sha256 {digest[:12]}")
    return digest
