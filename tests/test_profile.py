"""The config loader: every shipped profile validates; unknown keys, bad types and bad overrides fail with the fix."""
import pytest

from steps import profile as profiles

pytestmark = pytest.mark.unit
ALL_PROFILES = sorted(profiles.CONFIGS_DIR.glob("*.yaml"))


def test_every_real_profile_has_a_tiny_sibling():
    names = {p.stem for p in ALL_PROFILES}
    real = {n for n in names if not n.endswith("-tiny") and n != "tiny-cpu"}
    assert real, "no real profiles found"
    assert {f"{n}-tiny" for n in real} <= names


@pytest.mark.parametrize("path", ALL_PROFILES, ids=lambda p: p.name)
def test_every_profile_loads_and_validates(path):
    configs = profiles.validate(profiles.load_profile(path))
    assert set(configs) == set(profiles.SECTION_OF_STEP)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ValueError, match=r"unknown key harmony\.max_lenght; did you mean 'max_length'"):
        profiles.step_config(profiles.load_profile(profiles.DEFAULT_PROFILE, ["harmony.max_lenght=10"]), "harmony")


def test_unknown_section_is_rejected():
    with pytest.raises(ValueError, match="unknown section 'trian'; did you mean 'train'"):
        profiles.load_profile(profiles.DEFAULT_PROFILE, ["trian.max_steps=3"])


def test_overrides_are_typed_and_checked():
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE, ["harmony.max_length=512"])
    assert profiles.step_config(prof, "harmony").max_length == 512
    with pytest.raises(ValueError, match=r"harmony\.max_length='many' must be of type int"):
        profiles.step_config(profiles.load_profile(profiles.DEFAULT_PROFILE, ["harmony.max_length=many"]), "harmony")
    with pytest.raises(ValueError, match="must look like section.key=value"):
        profiles.load_profile(profiles.DEFAULT_PROFILE, ["max_length"])


def test_model_section_is_injected_and_checked():
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE)
    assert profiles.step_config(prof, "harmony").model == profiles.model_config(prof)
    with pytest.raises(ValueError, match="unknown key model.nmae"):
        profiles.model_config(profiles.load_profile(profiles.DEFAULT_PROFILE, ["model.nmae=x"]))


def test_missing_profile_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ValueError, match="tiny-cpu.yaml"):
        profiles.load_profile(tmp_path / "nope.yaml")


def test_scientific_notation_override_is_a_float():
    prof = profiles.load_profile(profiles.DEFAULT_PROFILE, ["train.learning_rate=1e-4", "push.repo_id=org/name"])
    assert prof["train"]["learning_rate"] == 1e-4 and prof["push"]["repo_id"] == "org/name"


def test_validating_every_profile_imports_no_ml_library():
    """The CPU steps' image and every `finetune check` should not pay for (or need) torch to read a profile."""
    import subprocess
    import sys

    code = ("import sys; from steps import profile as p; [p.validate(p.load_profile(f)) for f in p.CONFIGS_DIR.glob('*.yaml')]; "
            "print(sorted({'torch', 'transformers', 'trl', 'peft', 'datasets'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=profiles.CONFIGS_DIR.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lora_under_fsdp_with_activation_checkpointing_is_refused():
    prof = profiles.load_profile(profiles.CONFIGS_DIR / "8xh100-fsdp2.yaml", ["train.method=lora"])
    with pytest.raises(ValueError, match="saves an empty adapter .*set train.gradient_checkpointing=false"):
        profiles.step_config(prof, "train")


TINY = profiles.DEFAULT_PROFILE


@pytest.mark.parametrize("files, message", [
    ({"p.yaml": "train:\n  max_steps: [1, 2\n"},
     r"profile .*p.yaml line 3 column 1 is not valid YAML: expected ',' or '\]'.*\(while parsing a flow sequence at line 2\)"),
    ({"p.yaml": "base: p.yaml\n"}, r"profile .*p.yaml: base: p.yaml makes a cycle \(p.yaml -> p.yaml\)"),
    ({"p.yaml": "base: q.yaml\n", "q.yaml": "base: p.yaml\n"},
     r"base: p.yaml makes a cycle \(p.yaml -> q.yaml -> p.yaml\); remove base: from one of them"),
    ({"p.yaml": "base: nope.yaml\n"}, r"profile .*p.yaml: base: nope.yaml does not exist \(looked for .*nope.yaml\)"),
    ({"p.yaml": f"base: {TINY}\ntrain: 5\n"}, r"section train: must be a mapping of keys .*not int 5"),
    ({"p.yaml": f"base: {TINY}\ntrain:\n  max_steps: 3\n  max_steps: 4\n"},
     r"profile .*p.yaml line 4: key 'max_steps' appears twice in the same mapping; keep one"),
], ids=["malformed", "self-base", "base-cycle", "missing-base", "section-not-mapping", "duplicate-key"])
def test_a_broken_profile_file_is_named_with_the_fix(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        profiles.load_profile(tmp_path / "p.yaml")


def test_a_folder_as_profile_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--config .* is a folder; give a profile file, e.g. --config .*tiny-cpu.yaml"):
        profiles.load_profile(tmp_path)


def test_unknown_random_shape_key_is_caught_when_the_profile_is_read():
    with pytest.raises(ValueError, match=r"model.random_shape.num_layers is not a GptOssConfig field"):
        profiles.model_config(profiles.load_profile(TINY, ["model.random_shape.num_layers=3"]))
