"""`finetune`: the one command line, identical on a laptop, in a container and under a Prefect worker.

    finetune run [--config configs/tiny-cpu.yaml] [--out runs/latest] [section.key=value …]
    finetune step NAME --config FILE [--input UPSTREAM=DIR …] --out DIR [section.key=value …]
    finetune check --config FILE [--print] [section.key=value …]
"""
import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import yaml

from steps import contract, profile as profiles

log = logging.getLogger("finetune")
BUG_REPORT = ("finetune: this is a bug in gpt-oss-finetune, not a problem with your input: please report it on the "
              "project's issue tracker with the traceback above, the command you ran and `finetune --version`")


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


def _checked_profile(args) -> tuple[dict, dict]:
    """The profile with its overrides, every step's Config built from it, and the environment checked: everything
    that can fail before a step starts fails here, as one line."""
    from flows.preflight import check_environment

    profile = profiles.load_profile(args.config, args.overrides)
    configs = profiles.validate(profile)
    check_environment(profile)
    return profile, configs


def cmd_step(args) -> None:
    os.environ["FINETUNE_PROFILE"] = str(args.config)  # named in the plots' titles (train's loss_curve.png)
    if os.environ.get("FINETUNE_RUNTIME"):  # set by the step images (images/*.Dockerfile)
        _check_mounted(args.out, "--out")
        for pair in args.input:
            _check_mounted(Path(pair.partition("=")[2]), f"--input {pair.partition('=')[0]}=")
    profile = profiles.load_profile(args.config, args.overrides)
    cfg = profiles.step_config(profile, args.name)
    tracking = profiles.tracking_config(profile)
    uri = args.tracking_uri or tracking.uri
    is_main = contract.is_main_process()  # under torchrun, rank 0 alone tracks and reports
    if is_main and tracking.enabled and uri and args.parent_run_id:
        from flows.tracking import step_run

        # What the parent passes (finetune run, a step deployment, a container): the run to nest under and where.
        with step_run({"uri": uri, "parent_run_id": args.parent_run_id, "out_dir": str(Path(args.out).resolve().parent)},
                      args.name) as (tracker, finish):
            manifest, skipped = contract.execute(args.name, cfg, out_dir=args.out, inputs=_inputs(args.input),
                                                 tracker=tracker)
            finish(manifest, skipped)
    else:
        manifest, _ = contract.execute(args.name, cfg, out_dir=args.out, inputs=_inputs(args.input))
    if is_main:
        print(f"{args.name}: done, manifest at {Path(args.out) / contract.MANIFEST}")


def _children() -> list[int]:
    """This process's child processes (Linux /proc): Prefect's temporary server, a step's server."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if ppid == os.getpid():
            found.append(int(stat.parent.name))
    return found


_leaving = threading.Lock()


def _leave_interrupted() -> None:
    """Stop the child processes left, say so in one line and exit 130, skipping Prefect's exit hooks (which would
    retry their API calls to the stopped temporary server for minutes)."""
    _leaving.acquire()  # once, whichever thread comes first; the other blocks until the process is gone
    for pid in _children():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_is_running(pid) for pid in _children()):
        time.sleep(0.1)
    for pid in _children():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print("finetune: interrupted (Ctrl-C); the running step was stopped and left no manifest, its tracking runs are "
          "closed as KILLED; `finetune run` again resumes (train from its last checkpoint)", file=sys.stderr, flush=True)
    os._exit(130)


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _on_ctrl_c(cleaned_up: threading.Event):
    """SIGINT during `finetune run`: the step in progress unwinds as KeyboardInterrupt (its server stopped, its
    tracking run closed), the flow closes its own run, and then the process leaves; a second Ctrl-C leaves at once."""
    def handler(signum, frame):
        if cleaned_up.is_set() or handler.pressed:
            _leave_interrupted()
        handler.pressed = True
        threading.Thread(target=lambda: (cleaned_up.wait(timeout=15), _leave_interrupted()), daemon=True).start()
        raise KeyboardInterrupt
    handler.pressed = False
    return handler


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback. A ValueError is a user error whose message
    names the field and the fix, which the CLI prints as its last line: 25 lines of engine frames only bury it. The same
    for a step stopped at its orchestration.timeout_s: a limit the profile set, not a bug."""

    def filter(self, record):
        if record.exc_info and (isinstance(record.exc_info[1], ValueError)
                                or type(record.exc_info[1]).__name__ == "StepTimedOut"):
            record.exc_info, record.exc_text = None, None
        return True


def cmd_run(args) -> None:
    os.environ["FINETUNE_PROFILE"] = str(args.config)  # named in the plots' titles (train's loss_curve.png)
    _checked_profile(args)  # before Prefect starts (~20 s), so a typo costs a second and prints one line
    contract.check_out_dir(args.out)
    from flows.finetune import CLEANED_UP, finetune

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUserErrors())
    signal.signal(signal.SIGINT, _on_ctrl_c(CLEANED_UP))
    results = finetune(config=str(args.config), out=str(args.out), overrides=args.overrides)
    steps = [r for r in results if r["step"] != "promote"]
    print(f"\nfinetune: all {len(steps)} steps finished; outputs in {Path(args.out).resolve()}")
    for r in steps:
        print(f"  {r['step']:<8} {r['status']:<22} {r['duration_s']:>8.1f} s  {r['out_dir']}")
    gate = next((r for r in results if r["step"] == "promote"), None)
    if gate:
        print(f"finetune: promotion {gate['status']}: {gate['summary']}")
        if gate["status"] != "promoted":
            raise NotPromoted()


class NotPromoted(Exception):
    """The pipeline ran and the gate kept the champion: exit code 3, neither success (0) nor an error (1, 2)."""


def cmd_check(args) -> None:
    profile, configs = _checked_profile(args)
    if args.print:
        resolved = profiles.resolved(profile)
        print(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False, width=120), end="")
        return
    print(f"{args.config}: valid ({', '.join(configs)})")


def _override_help(sections) -> str:
    """The section.key=value overrides a command takes, listed from the Config classes themselves."""
    classes = {"model": profiles.ModelConfig, "tracking": profiles.TrackingConfig,
               "orchestration": profiles.OrchestrationConfig, "promote": profiles.PromoteConfig}
    classes.update({section: contract.step_module(step).Config for step, section in profiles.SECTION_OF_STEP.items()})
    lines = ["overrides: section.key=value after the flags, values in YAML (train.max_steps=10, smoke.languages=[French]);",
             "the profile's keys, with defaults and help, are in `finetune check --config FILE --print` and steps/*.py:"]
    for section in sections:
        keys = [f.name for f in dataclasses.fields(classes[section]) if f.name != "model"]
        lines += textwrap.wrap(", ".join(keys), width=110, initial_indent=f"  {section}: ", subsequent_indent="    ")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n")[0], formatter_class=formatter,
                                     epilog="`finetune COMMAND --help` lists a command's flags and overrides.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('gpt-oss-finetune')}")
    sub = parser.add_subparsers(dest="command", required=True)
    every_section = profiles.SECTIONS
    run = sub.add_parser("run", help="the whole pipeline as one Prefect flow (default: the embedded tiny profile)",
                         description="Run fetch → harmony → train → merge → push → smoke as one Prefect flow; finished "
                                     "steps are skipped, an interrupted train continues from its last checkpoint.",
                         epilog=_override_help(every_section), formatter_class=formatter)
    run.add_argument("--config", type=Path, default=profiles.DEFAULT_PROFILE, help="profile YAML (default: %(default)s)")
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="one folder per step (default: %(default)s)")
    step = sub.add_parser("step", help="one step into one out dir",
                          description="Run one step into --out, reading its upstream steps' out dirs (--input).",
                          epilog=_override_help(every_section), formatter_class=formatter)
    step.add_argument("name", choices=contract.STEPS)
    step.add_argument("--config", type=Path, required=True, help="profile YAML")
    step.add_argument("--out", type=Path, required=True, help="the step's out dir (manifest.json written last)")
    step.add_argument("--input", action="append", default=[], metavar="UPSTREAM=DIR",
                      help="an upstream step's out dir, e.g. --input harmony=runs/x/harmony (repeat per upstream)")
    step.add_argument("--parent-run-id", default="", help="MLflow parent run to nest this step's run under")
    step.add_argument("--tracking-uri", default="", help="MLflow tracking URI of the parent run (default: tracking.uri)")
    check = sub.add_parser("check", help="load and validate a profile without running anything",
                           description="Load a profile, check every step's config and the environment (Hub token for "
                                       "a real push, tracking server); run nothing.",
                           epilog=_override_help(every_section), formatter_class=formatter)
    check.add_argument("--config", type=Path, required=True, help="profile YAML")
    check.add_argument("--print", action="store_true", help="print the resolved profile (every key, defaults filled in)")
    return parser


def main(argv: list[str] | None = None) -> int:
    _third_party_defaults()
    parser = _parser()
    # argparse cannot place a variable number of positionals after a subcommand's own positionals, so overrides
    # are whatever is left over, and each must look like section.key=value.
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r]
    if bad:
        parser.error(f"unrecognized argument {bad[0]!r} (overrides look like section.key=value)")
    args.overrides = rest
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request to the Prefect API drowns progress
    # accelerate repeats an INFO line per process and batch when a resumed run skips the batches it had trained on.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        {"run": cmd_run, "step": cmd_step, "check": cmd_check}[args.command](args)
    except ValueError as e:
        # User errors (bad profile, bad input, unreachable services) print as one line naming the field and the fix.
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    except NotPromoted:
        return 3
    except KeyboardInterrupt:
        if args.command == "run":
            _leave_interrupted()
        print(f"finetune: interrupted (Ctrl-C); the {args.command} stopped and left no manifest", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ == "StepTimedOut":  # flows.finetune's (imported only once a run starts Prefect)
            print(f"finetune: error: {e}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
