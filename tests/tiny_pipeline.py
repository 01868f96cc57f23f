"""Overrides for the tests that exercise the tiny pipeline's plumbing (containers, deployments, tracking, the gate)
rather than what the default learns: tests/test_e2e.py trains the full default and checks its reasoning languages;
these train a third of its steps, enough for smoke's API checks, with the language checks off."""

TRAIN_STEPS = 48
OVERRIDES = [f"train.max_steps={TRAIN_STEPS}", "smoke.check_language=false", "smoke.min_languages_passing=0",
             "smoke.min_language_adherence=0", "smoke.allowed_finish_reasons=[stop,length]"]
