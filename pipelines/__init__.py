"""The MixGRPO KFP pipeline: the DAG, its compilation, the local run and the cluster client.

Installed as ``mixgrpo_pipelines.pipelines`` (the repository's ``components/`` as
``mixgrpo_pipelines.components``). Imports the components (and kfp); ``mixgrpo`` imports this
package only lazily, inside CLI subcommands.
"""
