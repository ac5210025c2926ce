"""Train LatentWire.

    python launch/train.py --config configs/tiny.json --output_dir runs/x [--set train.max_steps=8 ...]
    deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/tiny.json --output_dir D
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.json --output_dir D
    python launch/train.py --config configs/llama8b_qwen7b.json --output_dir D --dry_run   # resolve + plan only

Without CUDA the run uses DeepSpeed's CPU accelerator with gloo. Re-running with the same --output_dir resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentwire.distributed import setup_environment  # noqa: E402
from latentwire.monitor import quiet_known_warnings  # noqa: E402

setup_environment()  # before deepspeed is imported anywhere
quiet_known_warnings()

from latentwire import config as config_lib  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON preset (configs/*.json)")
    parser.add_argument("--output_dir", required=True, help="run directory; an existing one is resumed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (ds_configs/*.json); default: ZeRO-0")
    parser.add_argument("--dry_run", action="store_true", help="resolve the config, print the plan, load nothing")
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume an existing run directory even though its config differs")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_args(argv)


def dry_run(cfg: config_lib.Config, ds_path: str | None, out: Path) -> None:
    """Print the resolved config, the DeepSpeed stage, the split specification and the device plan; write
    OUT/run_info.json with the split specification (nothing is loaded, so the splits have no counts yet)."""
    from latentwire.data import split_spec
    from latentwire.distributed import read_ds_config, zero_stage

    print(json.dumps(config_lib.to_dict(cfg), indent=2))
    ds = read_ds_config(ds_path)
    print(f"deepspeed: {ds_path or 'built-in default'} (ZeRO stage {zero_stage(ds)})")
    splits = split_spec(cfg.data)
    print("splits: " + json.dumps(splits, indent=2))
    existing = out / "run_info.json"
    if existing.exists() and not json.loads(existing.read_text()).get("dry_run"):
        raise config_lib.ConfigError(f"--dry_run would overwrite the run_info.json of a real run in {out}; "
                                     "use another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    info = {"dry_run": True, "zero_stage": zero_stage(ds), "splits": splits}
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    from launch.plan import describe_config_plan

    print(describe_config_plan(cfg))


def main(argv=None) -> int:
    import time

    from latentwire.faults import install_requeue_handler

    started = time.time()
    install_requeue_handler()
    args = parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.set)
    except config_lib.ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            dry_run(cfg, args.deepspeed, Path(args.output_dir))
        except config_lib.ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    from latentwire.data import DataError
    from latentwire.distributed import DSConfigError
    from latentwire.faults import OOM_RESTART_EXIT_CODE, Relaunch, peer_requested_relaunch
    from latentwire.receivers import ContractError
    from latentwire.teachers import TeacherError
    from latentwire.train import main as train_main

    try:
        train_main(cfg, Path(args.output_dir), args.deepspeed, args.allow_config_change)
    except Relaunch as relaunch:
        # Leave at once, without interpreter teardown: a peer rank may still be inside a collective.
        print(f"relaunch ({relaunch.code}): {relaunch}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(relaunch.code)
    except (config_lib.ConfigError, DataError, DSConfigError, ContractError, TeacherError, FileNotFoundError) as err:
        # Bad input: one clear line naming the culprit, no traceback, nothing written over a good run.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # A peer rank that ran out of memory left for a relaunch (latentwire/faults.py) while this rank was inside
        # a collective with it, which then failed: leave with the peer's code, so the launcher reports 75 to the
        # supervisor whichever rank it sees exit first.
        if peer_requested_relaunch(Path(args.output_dir), started):
            print(f"relaunch ({OOM_RESTART_EXIT_CODE}): a peer rank ran out of memory ({type(err).__name__}: {err})",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(OOM_RESTART_EXIT_CODE)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
