"""Run by infra/prefect/setup.sh: the pools, the image-tag variable and the automations, created or updated."""
import json
import os
import string
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate, WorkPoolCreate, WorkPoolUpdate
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound

HERE = Path(__file__).resolve().parent


def _expand(value):
    """${VAR} from the environment (setup.sh fills it from setup.env first); a missing one is an error, not ''."""
    if isinstance(value, str):
        try:
            return string.Template(value).substitute(os.environ)
        except KeyError as e:
            raise ValueError(f"{value!r} needs {e.args[0]}; set it in infra/prefect/setup.env or the environment") from None
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def base_job_template(name: str, spec: dict) -> dict:
    if "base_job_template" in spec:
        return json.loads((HERE / spec["base_job_template"]).read_text())
    if spec["type"] == "docker":
        from prefect_docker.worker import DockerWorker as worker
    elif spec["type"] == "process":
        from prefect.workers.process import ProcessWorker as worker
    else:
        raise ValueError(f"pools.yaml: pool {name!r} of type {spec['type']!r} needs a base_job_template file")
    template = worker.get_default_base_job_template()
    properties = template["variables"]["properties"]
    for key, value in _expand(spec.get("job_variables", {})).items():
        if key not in properties:
            raise ValueError(f"pools.yaml: {name}.job_variables.{key} is not a {spec['type']} job variable; "
                             f"they are {', '.join(properties)}")
        properties[key]["default"] = value
    return template


def main() -> None:
    pools = yaml.safe_load((HERE / "pools.yaml").read_text())
    with get_client(sync_client=True) as client:
        for name, spec in pools.items():
            template = base_job_template(name, spec)
            try:
                existing = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=spec["type"], base_job_template=template))
                print(f"work pool {name} ({spec['type']}): created")
                continue
            if existing.type != spec["type"]:
                raise ValueError(f"work pool {name} exists with type {existing.type}, pools.yaml says {spec['type']}; "
                                 f"delete it (prefect work-pool delete {name}) and run this again")
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
            print(f"work pool {name} ({spec['type']}): updated")

        tag = os.environ["FINETUNE_IMAGE_TAG"]
        if client.read_variable_by_name("finetune_image_tag") is None:
            client.create_variable(VariableCreate(name="finetune_image_tag", value=tag))
        else:
            client.update_variable(VariableUpdate(name="finetune_image_tag", value=tag))
        print(f"variable finetune_image_tag = {tag}")

        for path in sorted(HERE.glob("automation-*.yaml")):
            spec = yaml.safe_load(_expand(path.read_text()))  # ${VAR}s first: `within` is a number of seconds
            notifies = ""
            for action in spec["actions"]:
                if action["type"] == "send-notification":
                    action["block_document_id"] = str(_block_id(client, os.environ["FINETUNE_NOTIFY_BLOCK"]))
                    notifies = f", notifies {os.environ['FINETUNE_NOTIFY_BLOCK']}"
            automation = AutomationCore.model_validate(spec)
            found = client.read_automations_by_name(spec["name"])
            if found:
                client.update_automation(found[0].id, automation)
                print(f"automation {spec['name']}: updated ({found[0].id}{notifies})")
            else:
                print(f"automation {spec['name']}: created ({client.create_automation(automation)}{notifies})")


def _block_id(client, block: str):
    block_type, _, block_name = block.partition("/")
    try:
        return client.read_block_document_by_name(block_name, block_type_slug=block_type).id
    except ObjectNotFound:
        raise ValueError(f"FINETUNE_NOTIFY_BLOCK={block}: no such block on {client.api_url}; create it (e.g. "
                         f"SlackWebhook(url=…).save({block_name!r})) or name another in infra/prefect/setup.env") from None

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"infra/prefect/setup.sh: error: {e}", file=sys.stderr)
        sys.exit(2)
