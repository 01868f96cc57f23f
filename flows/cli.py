"""`finetune`: the one command line, identical on a laptop, in a container and under a Prefect worker.

    finetune run [--config configs/tiny-cpu.yaml] [--out runs/latest] [section.key=value …]
    finetune step NAME --config FILE [--input UPSTREAM=DIR …] --out DIR [section.key=value …]
    finetune check --config FILE [section.key=value …]
"""
import argparse
import logging
import os
import re
import sys
from pathlib import Path

from steps import contract, profile as profiles

log = logging.getLogger("finetune")


def _third_party_defaults() -> None:
    """Environment defaults for the libraries under the CLI (a value the user set wins): no telemetry, and a
    start-up wait for Prefect's temporary server that a small machine meets."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # A fresh PREFECT_HOME migrates its database before the temporary server answers: ~20 s on a 2-core machine,
    # exactly Prefect's default wait, so a newcomer's first `finetune run` failed half the time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _inputs(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise ValueError(f"--input {pair!r} must look like UPSTREAM=DIR (e.g. --input fetch=runs/x/fetch)")
        out[name] = Path(path)
    return out


def _check_mounted(path: Path, flag: str) -> None:
    """Inside a step image, step folders must live on a host folder or a named volume: the container's own disk and
    an anonymous volume (what an unmounted VOLUME becomes) vanish with the container."""
    path = path.absolute()
    mount_point, root = "/", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = Path(fields[4].replace("\\040", " "))
        if (point == path or point in path.parents) and len(str(point)) >= len(mount_point):
            mount_point, root = str(point), fields[3]
    if mount_point == "/" or re.search(r"volumes/[0-9a-f]{64}/_data$", root):
        raise ValueError(f"{flag} {path} is not on a mounted volume in this container, so it would vanish with it; "
                         f"mount the host folder that holds it, e.g. docker run -v \"$PWD/runs:/runs\" … {flag} /runs/…")


def cmd_step(args) -> None:
    if os.environ.get("FINETUNE_RUNTIME"):  # set by the step images (images/*.Dockerfile)
        _check_mounted(args.out, "--out")
        for pair in args.input:
            _check_mounted(Path(pair.partition("=")[2]), f"--input {pair.partition('=')[0]}=")
    profile = profiles.load_profile(args.config, args.overrides)
    cfg = profiles.step_config(profile, args.name)
    tracking = profiles.tracking_config(profile)
    is_main = contract.is_main_process()  # under torchrun, rank 0 alone tracks and reports
    if is_main and tracking.enabled and tracking.uri and args.parent_run_id:
        from flows.tracking import step_run

        with step_run(tracking.uri, args.parent_run_id, args.name) as tracker:
            manifest, _ = contract.execute(args.name, cfg, out_dir=args.out, inputs=_inputs(args.input), tracker=tracker)
    else:
        manifest, _ = contract.execute(args.name, cfg, out_dir=args.out, inputs=_inputs(args.input))
    if is_main:
        print(f"{args.name}: done, manifest at {Path(args.out) / contract.MANIFEST}")


def cmd_run(args) -> None:
    from flows.finetune import finetune

    results = finetune(config=str(args.config), out=str(args.out), overrides=args.overrides)
    print(f"\nfinetune: all {len(results)} steps finished; outputs in {Path(args.out).resolve()}")
    for r in results:
        print(f"  {r['step']:<8} {r['status']:<22} {r['duration_s']:>8.1f} s  {r['out_dir']}")


def cmd_check(args) -> None:
    profile = profiles.load_profile(args.config, args.overrides)
    configs = profiles.validate(profile)
    print(f"{args.config}: valid ({', '.join(configs)})")


def main(argv: list[str] | None = None) -> int:
    _third_party_defaults()
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n")[0],
                                     epilog="Any profile key can follow as section.key=value, e.g. train.max_steps=10.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline as one Prefect flow (default: the embedded tiny profile)")
    run.add_argument("--config", type=Path, default=profiles.DEFAULT_PROFILE)
    run.add_argument("--out", type=Path, default=Path("runs/latest"))
    step = sub.add_parser("step", help="one step into one out dir")
    step.add_argument("name", choices=contract.STEPS)
    step.add_argument("--config", type=Path, required=True)
    step.add_argument("--out", type=Path, required=True)
    step.add_argument("--input", action="append", default=[], metavar="UPSTREAM=DIR")
    step.add_argument("--parent-run-id", default="", help="MLflow parent run to nest this step's run under")
    check = sub.add_parser("check", help="load and validate a profile without running anything")
    check.add_argument("--config", type=Path, required=True)
    # argparse cannot place a variable number of positionals after a subcommand's own positionals, so overrides
    # are whatever is left over, and each must look like section.key=value.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized argument {bad[0]!r} (overrides look like section.key=value)")
    args.overrides = rest
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request to the Prefect API drowns progress
    try:
        {"run": cmd_run, "step": cmd_step, "check": cmd_check}[args.command](args)
    except ValueError as e:
        # User errors (bad profile, bad input) print as one line; anything else keeps its traceback.
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
