"""cache-rewards: put each reward model's weights into the object store once, with a sha256 manifest."""

from kfp import dsl

from mixgrpo_pipelines.components.container_images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def cache_rewards(
    rewards: str,
    held_out_rewards: str,
    reward_weight_sources: str,
    object_store_uri: str,
    cache_version: str = "v1",
) -> str:
    """Check the reward names and cache the weights of those that have weights under OBJECT_STORE/rewards.

    Args:
        rewards: Optimised rewards, comma-separated (see `mixgrpo rewards list`).
        held_out_rewards: Rewards measured but never optimised, comma-separated.
        reward_weight_sources: name=URI pairs (or a JSON object): where each weighted reward's files are (local dir, s3:// or file://).
        object_store_uri: Object-store root; weights go to rewards/NAME/VERSION with MANIFEST.json.
        cache_version: Version label of the cached weights.

    Returns:
        The rewards.options of the training config as JSON: {name: {"weights_dir": URI}}.
    """
    import json

    from mixgrpo_pipelines.pipelines.steps import RunLayout, cache_rewards_step

    from mixgrpo.console import say

    dest = RunLayout(object_store_uri, "cache").rewards
    options = cache_rewards_step(rewards, held_out_rewards, reward_weight_sources, dest, cache_version)
    say(f"{len(options)} reward weight sets cached" + (f" under {dest}" if options else " (these rewards need none)"))
    return json.dumps(options)
