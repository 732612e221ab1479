"""``mixgrpo`` command line. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from mixgrpo.config import config_to_yaml, load_config
    from mixgrpo.train import train

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    result = train(cfg, resume=args.resume, device=args.device, require_checkpoint=args.require_checkpoint)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"\nfinished {result.iterations} iterations in {result.seconds:.0f} s; weights: {result.final_weights}")
    print(f"{'held-out reward':<22}{'before':>9}{'after':>9}")
    for name in result.held_out_before:
        print(f"{name:<22}{result.held_out_before[name]:>9.4f}{result.held_out_after[name]:>9.4f}")
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from mixgrpo.distributed import run_launch

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return run_launch(train_args, engine=args.engine, launcher=args.launcher, nproc_per_node=args.nproc_per_node)


def _cmd_config(args: argparse.Namespace) -> int:
    from mixgrpo.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_toy_pretrain(args: argparse.Namespace) -> int:
    from mixgrpo.toy.pretrain import ensure_base_model

    path = ensure_base_model(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    made = "pre-trained here" if args.force else "the shipped one or cached"
    print(f"toy base model ({made}): {path}")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,5"`` or ``"0-3"`` (inclusive) or a mix -> seeds; the evaluation uses seeds 0..K-1."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, sep, high = part.partition("-")
        if not (low.isdigit() and (not sep or high.isdigit())):
            raise ValueError(f"--seeds {text!r}: write seeds like 0,1,2,3 or 0-3")
        seeds += list(range(int(low), int(high) + 1)) if sep else [int(low)]
    if not seeds:
        raise ValueError(f"--seeds {text!r}: give at least one seed")
    return seeds


def _cmd_sample(args: argparse.Namespace) -> int:
    import json

    import torch

    from mixgrpo.config import load_config
    from mixgrpo.eval_sampler import sample_eval_images
    from mixgrpo.grids import save_grid, to_pil
    from mixgrpo.model_source import load_policy, resolve_model_source
    from mixgrpo.policies import build_policy
    from mixgrpo.train import load_prompts

    cfg = load_config(args.config, args.overrides)
    prompts = list(args.prompt or []) + (load_prompts(args.prompts, "test") if args.prompts else [])
    prompts = prompts or load_prompts(cfg.eval_prompts, "test")[: args.max_prompts]
    seeds = parse_seeds(args.seeds)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.model:
        policy = load_policy(resolve_model_source(args.model, args.mlflow), cfg, device, source=args.model)
    else:
        policy = build_policy(cfg, device)
    rows = [p for p in prompts for _ in seeds]
    images = sample_eval_images(policy, rows, seeds * len(prompts), cfg, device)
    if args.out_dir:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "index.jsonl").open("w") as index:
            for i, (prompt, seed) in enumerate(zip(rows, seeds * len(prompts))):
                name = f"p{i // len(seeds):03d}_s{seed}.png"
                to_pil(images[i]).save(out_dir / name)
                index.write(json.dumps({"prompt": prompt, "seed": seed, "file": name}) + "\n")
        print(f"wrote {len(rows)} images and index.jsonl to {out_dir}")
    if args.out or not args.out_dir:
        path = save_grid(images, args.out or "samples.png", columns=len(seeds), scale=args.scale, row_labels=prompts,
                         label_width=220, column_labels=[f"seed {s}" for s in seeds])
        print(f"wrote {path} ({len(prompts)} prompts x {len(seeds)} seeds)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mixgrpo.config import load_config
    from mixgrpo.evaluate import evaluate, metrics_table

    cfg = load_config(args.config, args.overrides)
    prompts = None
    if args.prompts:
        from mixgrpo.train import load_prompts

        prompts = load_prompts(args.prompts, "test")
    result = evaluate(cfg, args.tuned, args.out, prompts=prompts, images_per_prompt=args.images_per_prompt,
                      hybrid_steps=args.hybrid_steps, training_metrics=args.training_metrics, device=args.device)
    print(metrics_table(result))
    print(f"\nreport: {Path(args.out) / 'report.md'} (and report.html, grid.png)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mixgrpo.bench import main as bench_main

    return bench_main(args)


def _cmd_rewards_list(args: argparse.Namespace) -> int:
    from mixgrpo.rewards import available_rewards

    for name in available_rewards():
        print(name)
    return 0


def _cmd_rewards_cache(args: argparse.Namespace) -> int:
    from mixgrpo.rewards.cache import cache_reward_weights
    from mixgrpo.storage import StorageError

    try:
        uri = cache_reward_weights(args.name, args.source, args.dest, args.version)
    except StorageError as error:
        print(f"mixgrpo: storage error: {error}", file=sys.stderr)
        return 1
    print(uri)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from mixgrpo.storage import StorageError, publish_dir

    if not Path(args.directory).is_dir():
        raise FileNotFoundError(f"{args.directory} is not a directory")
    try:
        manifest = publish_dir(args.directory, args.uri)
    except StorageError as error:
        print(f"mixgrpo: storage error: {error}", file=sys.stderr)
        return 1
    print(f"published {len(manifest.files)} files to {args.uri} (MANIFEST.json last)")
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    from mixgrpo_pipelines.pipelines.local import main as run_local_main  # kfp is imported here, never by the library

    return run_local_main(args)


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from mixgrpo_pipelines.pipelines.cluster import main as pipeline_main

    return pipeline_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixgrpo",
        description="MixGRPO: GRPO alignment of flow-matching text-to-image models with a sliding window of SDE steps.",
        epilog="Config overrides are section.key=value pairs, e.g. `mixgrpo train --config toy optim.lr=3e-5 mode=dancegrpo`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML config file (a file, or a shipped preset by name: toy)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-5")

    p = sub.add_parser("train", help="run MixGRPO training (or a baseline mode)")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--require-checkpoint", action="store_true",
                   help="like --resume, but fail when there is no checkpoint instead of starting from scratch")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("launch", help="several processes / nodes: torchrun (or accelerate) around `train`, "
                                      "flags from the Kubeflow Trainer's PET_* variables",
                       epilog="e.g. mixgrpo launch --engine ddp --nproc-per-node 2 -- train --config toy (make run's training)")
    p.add_argument("--engine", choices=["none", "ddp", "fsdp", "deepspeed"], help="sets distributed.engine (default: the config's)")
    p.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    p.add_argument("--nproc-per-node", help="processes per node (default: $PET_NPROC_PER_NODE, else 'gpu' / 1)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- train --config ... [KEY=VALUE ...] [--resume]")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("config", help="print the resolved config (defaults -> mode preset -> file -> overrides)")
    add_config_args(p)
    p.set_defaults(func=_cmd_config)

    toy = sub.add_parser("toy", help="the built-in toy world").add_subparsers(dest="toy_command", metavar="COMMAND", required=True)
    p = toy.add_parser("pretrain", help="install the toy base model the wheel ships (--force: pre-train it again by flow matching, ~55 min)")
    p.add_argument("--cache-dir", help="cache directory (default: $MIXGRPO_CACHE or ~/.cache/mixgrpo)")
    p.add_argument("--force", action="store_true", help="pre-train again (24000 steps, one thread) instead of the shipped or cached model")
    p.set_defaults(func=_cmd_toy_pretrain)

    p = sub.add_parser("sample", help="images from a model: a directory, file://, s3:// or models:/NAME@ALIAS",
                       epilog="e.g. mixgrpo sample --model models:/mixgrpo-dit@champion --prompt 'a red circle on a "
                              "black background' --seeds 0-3 --out grid.png (MLFLOW_TRACKING_URI or --mlflow)")
    add_config_args(p)
    p.add_argument("--model", help="weights: OUTPUT_DIR/final, file://, s3:// prefix, models:/NAME@ALIAS or "
                                   "models:/NAME/VERSION (default: the config's model / the toy base)")
    p.add_argument("--mlflow", help="MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the held-out prompts")
    p.add_argument("--prompts", help="text file of prompts, one per line")
    p.add_argument("--max-prompts", type=int, default=8, help="with the default prompts: at most this many")
    p.add_argument("--seeds", default="0-3", help="seeds, e.g. 0,1,2,3 or 0-3 (the evaluation's seeds are 0..K-1)")
    p.add_argument("--scale", type=int, default=3, help="pixel upscaling of the grid")
    p.add_argument("--out", help="PNG grid (rows = prompts, columns = seeds); default samples.png without --out-dir")
    p.add_argument("--out-dir", help="one PNG per (prompt, seed) and index.jsonl (prompt, seed, file)")
    p.add_argument("--device")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="base vs tuned on held-out prompts with every configured reward")
    add_config_args(p)
    p.add_argument("--tuned", required=True, help="the tuned model directory (OUTPUT_DIR/final)")
    p.add_argument("--out", required=True, help="where metrics.json, report.md/.html and grid.png go")
    p.add_argument("--prompts", help="held-out prompt file (default: the config's eval_prompts / toy held-out split)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="seeds per prompt (0..K-1)")
    p.add_argument("--hybrid-steps", type=int, help="tuned model for the first K steps, base for the rest")
    p.add_argument("--training-metrics", help="metrics.jsonl of the training run (for the reward curve)")
    p.add_argument("--device")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="speed of every mode (and --learning: reward vs wall time)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--learning", action="store_true", help="learning-efficiency run: reward vs seconds for every mode")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    p.add_argument("--iterations", type=int, default=80, help="--learning: iterations per mode")
    p.add_argument("--seeds", type=int, default=3, help="--learning: seeds per mode (mean and 95%% CI over them)")
    p.add_argument("--lr-sweep", default="", help="--learning: comma-separated learning rates; one seed each on the validation prompts, picks each mode's lr")
    p.add_argument("--rerun", action="store_true", help="--learning: train again even where a finished run is in --out")
    p.add_argument("--out", default="runs/bench", help="where plots and raw results go")
    from mixgrpo.bench_flux import add_flux_bench_args

    add_flux_bench_args(p)
    p.set_defaults(func=_cmd_bench)

    rewards = sub.add_parser("rewards", help="reward models").add_subparsers(dest="rewards_command", metavar="COMMAND", required=True)
    p = rewards.add_parser("list", help="registered reward names")
    p.set_defaults(func=_cmd_rewards_list)
    p = rewards.add_parser("cache", help="publish a reward's weights to {dest}/{name}/{version}/ with a sha256 manifest")
    p.add_argument("--name", required=True, help="hps / pickscore / imagereward / clip")
    p.add_argument("--source", required=True, help="local directory or s3:// / file:// URI holding the reward's files")
    p.add_argument("--dest", required=True, help="object-store prefix, e.g. s3://bucket/rewards")
    p.add_argument("--version", required=True, help="version label, e.g. v2.1")
    p.set_defaults(func=_cmd_rewards_cache)

    p = sub.add_parser("publish", help="copy a local directory (e.g. FLUX.1-dev) to s3:// / file:// with a sha256 "
                                       "manifest: what model_uri and `sample --model` read")
    p.add_argument("directory", help="local directory, e.g. a diffusers FLUX.1-dev download")
    p.add_argument("uri", help="destination prefix, e.g. s3://bucket/models/flux-dev (credentials from AWS_*)")
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser("run-local", help="the main job: the whole pipeline through kfp.local on the built-in toy model",
                       epilog="defaults: object store runs/local/store (file://), MLflow runs/local/mlflow.db (sqlite)")
    p.add_argument("--store", help="object-store root, e.g. s3://bucket/prefix (credentials from AWS_* variables)")
    p.add_argument("--mlflow", help="MLflow tracking URI, e.g. http://127.0.0.1:5000")
    p.add_argument("--preset", help="training preset under the --param values: a shipped name or a YAML file; none "
                   "= the pipeline defaults (default: toy, see `mixgrpo config --config toy`; none with a model_uri)")
    p.add_argument("--iterations", type=int, help="training iterations (default: the preset's max_iterations)")
    p.add_argument("--gate-margin", type=float, help="the new version must beat the champion by more than this")
    p.add_argument("--param", action="append", metavar="NAME=VALUE", help="any pipeline parameter (repeatable)")
    p.add_argument("--json", action="store_true", help="after the table, print one JSON object on the last line")
    p.set_defaults(func=_cmd_run_local)

    pipe = sub.add_parser("pipeline", help="compile the pipeline, submit / schedule it on Kubeflow Pipelines")
    actions = pipe.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("compile", "write the pipeline YAML"),
                         ("submit", "upload a pipeline version named by the git sha and start a run"),
                         ("schedule", "upload a version and create a recurring run")):
        p = actions.add_parser(action, help=text)
        p.add_argument("--image-tag", help="image tag in the YAML (compile: v<version>; submit/schedule: the git sha)")
        p.add_argument("--registry", help="image registry (default: $MIXGRPO_IMAGE_REGISTRY)")
        if action == "compile":
            p.add_argument("--output", default=None, help="output file (default: pipelines/mixgrpo_pipeline.yaml)")
        else:
            p.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST)")
            p.add_argument("--token-file", help="file holding the bearer token (default: $KFP_TOKEN)")
            p.add_argument("--token", help=argparse.SUPPRESS)  # deprecated: the value shows in the process list
            p.add_argument("--namespace", help="Kubeflow profile namespace (default: $KFP_NAMESPACE)")
            p.add_argument("--experiment", default="mixgrpo", help="KFP experiment")
            p.add_argument("--pipeline-name", default="mixgrpo", help="KFP pipeline the version is added to")
            p.add_argument("--git-sha", help="version name and git_sha tag (default: $GITHUB_SHA / git rev-parse)")
            p.add_argument("--service-account", default="mixgrpo-launcher", help="ServiceAccount of the run's pods")
            p.add_argument("--param", action="append", metavar="NAME=VALUE", help="pipeline parameter (repeatable)")
            if action == "submit":
                p.add_argument("--wait", type=int, default=0, metavar="SECONDS", help="wait for the run; exit 1 unless it succeeds")
            else:
                p.add_argument("--cron", default="0 0 3 * * 1", help="KFP cron (6 fields, seconds first): default Mondays 03:00")
        p.set_defaults(func=_cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (getattr(args, "overrides", None) is None or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # KEY=VALUE overrides may also follow flags: `train --config c.yaml --resume a.b=1`
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mixgrpo.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as error:
        print(f"mixgrpo: config error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        print(f"mixgrpo: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # storage outages, corrupt checkpoints, reward outages: one line naming the cause
        from mixgrpo.storage import StorageError
        from mixgrpo.checkpoint import CheckpointError
        from mixgrpo.train import RewardOutageError

        if not isinstance(error, (StorageError, CheckpointError, RewardOutageError)):
            raise
        print(f"mixgrpo: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
