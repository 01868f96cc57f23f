"""The one config loader: a profile YAML (+ dotted key=value overrides) into each step's typed, validated Config."""
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from steps.model import ModelConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PROFILE = CONFIGS_DIR / "tiny-cpu.yaml"
SECTION_OF_STEP = {"fetch": "data", "harmony": "harmony", "train": "train", "merge": "merge", "push": "push", "smoke": "smoke"}
SECTIONS = ("model", *SECTION_OF_STEP.values(), "tracking", "orchestration", "promote")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; empty: `finetune run` uses sqlite in its out dir, `finetune step` does not track."""
    experiment: str = "gpt-oss-finetune"
    """MLflow experiment name."""
    enabled: bool = True
    """Set false to run without MLflow at all."""


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    """The promotion gate: the alias `champion` moves to this run's registered version only when the smoke test
    passed and every metric below is no worse than the champion's (within its tolerance); a first run is promoted when
    smoke passes."""
    enabled: bool = True
    """Register the pushed model and run the gate (needs tracking)."""
    registered_model: str = ""
    """Model Registry name; empty: the name part of push.repo_id."""
    metrics: list = dataclasses.field(default_factory=lambda: [
        {"name": "train/eval_loss_after", "direction": "lower", "tolerance": 0.01}])
    """[{name, direction: lower|higher (which is better), tolerance}]; name is any metric of the pipeline run
    (`<step>/<field>` of a step's Output: train/eval_loss_after, smoke/..., merge/...)."""

    def __post_init__(self):
        for i, m in enumerate(self.metrics):
            if not isinstance(m, dict) or set(m) - {"name", "direction", "tolerance"} or "name" not in m:
                raise ValueError(f"promote.metrics[{i}]={m!r} must be a mapping {{name, direction, tolerance}}, e.g. "
                                 "{name: train/eval_loss_after, direction: lower, tolerance: 0.01}")
            if m.get("direction", "lower") not in ("lower", "higher"):
                raise ValueError(f"promote.metrics[{i}].direction={m['direction']!r}: use lower or higher (which is better)")
            if not isinstance(m.get("tolerance", 0.0), (int, float)) or m.get("tolerance", 0.0) < 0:
                raise ValueError(f"promote.metrics[{i}].tolerance={m.get('tolerance')!r} must be a number >= 0")
            if "/" not in m["name"]:
                raise ValueError(f"promote.metrics[{i}].name={m['name']!r}: metrics are named <step>/<field>, "
                                 "e.g. train/eval_loss_after or smoke/mean_latency_s")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; in a profile that hides which value is in force."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in the same "
                                 "mapping; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

@dataclass(frozen=True, kw_only=True)
class OrchestrationConfig:
    timeout_s: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per step, the most seconds it may run as its own deployment (finetune/prod: then its flow run is cancelled,
    its container stopped and the run fails), e.g. {train: 21600}; a step not listed has no limit. In-process runs
    (`finetune run`, finetune/dev) have none."""
    retries: int = 2
    """How often a step run as its own deployment is retried after a crash or a lost worker (never for a ValueError)."""
    retry_delay_s: int = 30
    """The first retry's delay; each further retry waits twice as long."""

    def __post_init__(self):
        unknown = [k for k in self.timeout_s if k not in SECTION_OF_STEP]
        if unknown:
            raise ValueError(f"orchestration.timeout_s.{unknown[0]}: no such step; steps are {', '.join(SECTION_OF_STEP)}")
        bad = [k for k, v in self.timeout_s.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
        if bad:
            raise ValueError(f"orchestration.timeout_s.{bad[0]}={self.timeout_s[bad[0]]!r} must be a positive number of seconds")
        if self.retries < 0:
            raise ValueError(f"orchestration.retries={self.retries} must be 0 or more")


def _read_yaml(path: Path) -> dict:
    shipped = ", ".join(p.name for p in sorted(CONFIGS_DIR.glob("*.yaml")))
    if path.is_dir():
        raise ValueError(f"--config {path} is a folder; give a profile file, e.g. --config {CONFIGS_DIR / 'tiny-cpu.yaml'} "
                         f"(shipped: {shipped})")
    if not path.is_file():
        raise ValueError(f"profile {path} does not exist; pick one of {shipped} in {CONFIGS_DIR}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        context = f" ({e.context} at line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ValueError(f"profile {path}{where} is not valid YAML: {e.problem or e.context}{context}; fix the YAML there") from None
    except ValueError as e:
        raise ValueError(f"profile {path} {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"profile {path} must be a mapping of sections ({', '.join(SECTIONS)}), not {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _parse_value(raw: str):
    """A YAML value, except that 1e-4 is a float (YAML 1.1, as PyYAML reads it, wants 1.0e-4)."""
    value = yaml.safe_load(raw) if raw else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A profile merged over the profile its `base:` names, recursively; a cycle or a missing base is an error."""
    data = _read_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ValueError(f"profile {path}: base: must be a file name (e.g. base: h100-lora.yaml), not {base!r}")
    base_path = (path.parent / base).resolve()
    chain = (*chain, path.resolve())
    if base_path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(base_path):], base_path))
        raise ValueError(f"profile {path}: base: {base} makes a cycle ({cycle}); remove base: from one of them")
    if not base_path.is_file():
        raise ValueError(f"profile {path}: base: {base} does not exist (looked for {base_path}); "
                         "fix the name, relative to the profile's own folder")
    return _merge(_read_with_bases(base_path, chain), data)


def load_profile(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a profile (following `base:` to the profile it extends) and apply `section.key=value` overrides."""
    path = Path(path)
    data = _read_with_bases(path)
    for section, body in data.items():
        if body is not None and not isinstance(body, dict):
            raise ValueError(f"profile {path}: section {section}: must be a mapping of keys (e.g. {section}: "
                             f"{{key: value}}), not {type(body).__name__} {body!r}")
    data = {section: body or {} for section, body in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=10)")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node[leaf] = _parse_value(raw)
    unknown = [s for s in data if s not in SECTIONS]
    if unknown:
        raise ValueError(f"profile {path}: unknown section {unknown[0]!r}; {_suggest(unknown[0], SECTIONS)}sections are {', '.join(SECTIONS)}")
    return data


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}={value!r} is not allowed; choose one of {', '.join(map(repr, typing.get_args(hint)))}")
        return
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(hint):
            try:
                return _check_type(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[-1])
    if hint is type(None):
        if value is not None:
            raise ValueError(f"{where}={value!r} must be null")
        return
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if base is int and isinstance(value, bool):
        raise ValueError(f"{where}={value!r} must be an integer")
    if isinstance(base, type) and not isinstance(value, base):
        raise ValueError(f"{where}={value!r} must be of type {getattr(base, '__name__', base)}, not {type(value).__name__}")


def build(cls, values: dict, *, section: str, extra: dict | None = None):
    """`cls(**values)` with unknown keys rejected (closest valid key suggested) and field types checked."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in (extra or {})]
    for key in values:
        if key not in names:
            raise ValueError(f"unknown key {section}.{key}; {_suggest(key, names)}valid keys are {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.name not in (extra or {})
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{section}.{missing[0]} is required; set it in the profile's {section}: section or pass {section}.{missing[0]}=…")
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            values[key] = build(hints[key], value, section=f"{section}.{key}")
        else:
            _check_type(value, hints[key], f"{section}.{key}")
    return cls(**values, **(extra or {}))


def model_config(profile: dict) -> ModelConfig:
    if "model" not in profile:
        raise ValueError("the profile has no model: section; add one (e.g. model: {name: openai/gpt-oss-20b})")
    return build(ModelConfig, profile["model"], section="model")


def tracking_config(profile: dict) -> TrackingConfig:
    return build(TrackingConfig, profile.get("tracking", {}), section="tracking")


def orchestration_config(profile: dict) -> OrchestrationConfig:
    return build(OrchestrationConfig, profile.get("orchestration", {}), section="orchestration")


def promote_config(profile: dict) -> PromoteConfig:
    return build(PromoteConfig, profile.get("promote", {}), section="promote")


def step_config(profile: dict, step: str):
    """The typed Config of `step` from its profile section, with the `model` section injected where it takes one."""
    from steps.contract import step_module

    cls = step_module(step).Config
    section = SECTION_OF_STEP[step]
    extra = {"model": model_config(profile)} if "model" in {f.name for f in dataclasses.fields(cls)} else {}
    return build(cls, profile.get(section, {}), section=section, extra=extra)


def resolved(profile: dict) -> dict:
    """Every key with the value a run would use (defaults filled in), by section: a profile that loads back as it is."""
    out = {"model": dataclasses.asdict(model_config(profile))}
    for step, section in SECTION_OF_STEP.items():
        out[section] = {k: v for k, v in dataclasses.asdict(step_config(profile, step)).items() if k != "model"}
    out["tracking"] = dataclasses.asdict(tracking_config(profile))
    out["orchestration"] = dataclasses.asdict(orchestration_config(profile))
    out["promote"] = dataclasses.asdict(promote_config(profile))
    return out


def validate(profile: dict) -> dict:
    """Every step's Config, built (and so validated) up front: bad input fails before any GPU time is spent."""
    tracking_config(profile)
    orchestration_config(profile)
    promote_config(profile)
    return {step: step_config(profile, step) for step in SECTION_OF_STEP}
