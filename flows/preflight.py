"""What `finetune check` and the flow verify before the first step, beyond the profile's own rules: the environment a
run will need hours later (a Hub token for a real push, a tracking server that answers). No ML or MLflow import."""
import os
import urllib.error
import urllib.request

from steps import profile as profiles


def check_environment(profile: dict) -> None:
    push = profiles.step_config(profile, "push")
    if not push.dry_run and not os.environ.get(push.token_env):
        raise ValueError(f"push.dry_run=false needs a Hugging Face token with write access in ${push.token_env} "
                         f"(push.token_env); export {push.token_env}=hf_… (https://huggingface.co/settings/tokens) "
                         "or set push.dry_run=true")
    tracking = profiles.tracking_config(profile)
    if tracking.enabled and tracking.uri.startswith(("http://", "https://")):
        url = tracking.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                answered = resp.status == 200
        except (urllib.error.URLError, OSError) as e:
            answered, why = False, getattr(e, "reason", e)
        else:
            why = f"HTTP {resp.status}"
        if not answered:
            raise ValueError(f"tracking.uri={tracking.uri} does not answer ({url}: {why}); start the MLflow server, or "
                             "set tracking.uri= (empty: a local sqlite store in the run's out dir) or tracking.enabled=false")
