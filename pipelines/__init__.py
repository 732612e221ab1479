"""The MixGRPO KFP pipeline: the DAG, its compilation, the local run and the cluster client.

Imports ``components`` (and kfp); ``mixgrpo`` imports this package only lazily, inside CLI
subcommands.
"""
