"""The container image of each component, from the one place that names images (mixgrpo.container_images).

Resolved when the components are imported (that is, at compile time): ``$MIXGRPO_IMAGE_TAG`` /
``$MIXGRPO_IMAGE_REGISTRY`` / ``$MIXGRPO_IMAGE_<KEY>`` override them; see images/README.md.
Every image has kfp installed, so components are built with ``install_kfp_package=False``
(no pip install at run time, and none under ``kfp.local``).
"""

from mixgrpo.container_images import image_ref

RUNTIME_IMAGE = image_ref("runtime")  # CPU steps: prepare, cache, train launcher, register, promote
EVALUATOR_IMAGE = image_ref("evaluator")  # GPU evaluation with the reward models
