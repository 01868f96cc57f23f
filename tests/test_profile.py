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


def test_loading_a_profile_does_not_import_torch():
    """The CPU steps' image and every `finetune check` should not pay for (or need) torch to read a profile."""
    import subprocess
    import sys

    code = ("import sys; from steps import profile as p; p.step_config(p.load_profile(p.DEFAULT_PROFILE), 'fetch'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=profiles.CONFIGS_DIR.parent)
    assert out.stdout.strip() == "False", out.stderr


def test_lora_under_fsdp_with_activation_checkpointing_is_refused():
    prof = profiles.load_profile(profiles.CONFIGS_DIR / "8xh100-fsdp2.yaml", ["train.method=lora"])
    with pytest.raises(ValueError, match="saves an empty adapter .*set train.gradient_checkpointing=false"):
        profiles.step_config(prof, "train")
