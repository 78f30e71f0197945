"""params.yaml and dvc.yaml checked against the code; every config error names its key."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import REPO
from loraops.core.config import ConfigError, Params, load_params, parse_override


def test_params_yaml_loads_and_matches_defaults_shape():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert set(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))) == set(Params.model_fields)


def test_overrides_are_typed():
    params = load_params(REPO / "params.yaml", ["train.learning_rate=1e-4", "lora.r=8", "data.format=qa",
                                                "lora.target_modules=[q_proj, v_proj]"])
    assert params.train.learning_rate == pytest.approx(1e-4)
    assert params.lora.r == 8 and params.data.format == "qa"
    assert params.lora.target_modules == ["q_proj", "v_proj"]


def test_all_errors_at_once_each_naming_its_key():
    with pytest.raises(ConfigError) as err:
        load_params(REPO / "params.yaml", ["train.learning_rate=-1", "lora.r=0", "data.format=xml"])
    text = str(err.value)
    assert "train.learning_rate must be > 0, got -1" in text
    assert "lora.r must be > 0, got 0" in text
    assert "data.format" in text and "xml" in text


def test_misspelt_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"train.lerning_rate: unknown key \(did you mean train.learning_rate\?\)"):
        load_params(REPO / "params.yaml", ["train.lerning_rate=0.1"])


def test_missing_params_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.learning_rate")


def test_dvc_stages_match_cli_commands_and_params_sections():
    from loraops.cli import load_commands

    app = load_commands()

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    sections = set(Params.model_fields)
    assert list(dvc["stages"]) == ["prepare", "augment", "index", "train", "evaluate"]
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"loraops {name}" and name in commands
        for param in stage["params"]:
            section, *rest = param.split(".")
            assert section in sections, param
        for dep in stage["deps"]:
            assert dep.startswith("${") or (REPO / dep).exists() or dep.startswith(("data/prepared", "data/augmented", "data/retrieved", "models/")), dep


def test_prefect_form_values_become_overrides_only_where_changed(tmp_path):
    from loraops.orchestration import form
    from loraops.orchestration.workspace import write_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    current = load_params(tmp_path / "params.yaml")
    values = form.defaults(current)
    assert form.overrides(current, {k: values[k] for k in form.QUICK}, {g: values[g] for g in form.GROUPS}) == []
    assert values["data"]["template"] == "질문: {question}\\n답변: " and values["eval"]["stop_strings"] == ["\\n질문:"]
    quick = {k: values[k] for k in form.QUICK} | {"learning_rate": 1e-4, "eval_questions": 40}
    groups = {g: dict(values[g]) for g in form.GROUPS}
    groups["registry"]["gate"] = dict(groups["registry"]["gate"], min_gain=0.02)
    groups["data"]["template"] = "Q: {question}\\nA: "
    overrides = form.overrides(current, quick, groups)
    assert overrides == ['data.template="Q: {question}\\nA: "', "registry.gate.min_gain=0.02",
                         "train.learning_rate=0.0001", "eval.max_samples=40"]
    written = write_params("params.yaml", overrides, tmp_path)
    assert written.train.learning_rate == 1e-4 and written.data.template == "Q: {question}\nA: "
    text = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    assert "learning_rate: 0.0001" in text and "# loraops parameters" in text  # comments kept


def test_form_shows_every_text_one_way_none_as_empty_and_an_optional_block_behind_a_switch():
    """The groups hold the keys people change (form.SHOWN); every text value is escaped the same way (rag.template
    too); an `X | None` text is a plain input where empty means none; `eval.tone` (null by default) is the block
    under an `enabled` switch, and switching it on sets the whole block."""
    from loraops.flows.finetune import finetune
    from loraops.orchestration import form

    current = load_params(REPO / "params.yaml")
    values = form.defaults(current)
    assert values["rag"]["template"] == "참고 자료:\\n{context}\\n\\n질문: {question}\\n답변: "
    assert values["data"]["system_prompt"] == "" and values["eval"]["tone"]["enabled"] is False
    groups = {g: dict(values[g]) for g in form.GROUPS}
    quick = {k: values[k] for k in form.QUICK}
    groups["eval"]["tone"] = dict(groups["eval"]["tone"], enabled=True, column="target_age")
    groups["data"] = dict(groups["data"], system_prompt="친절한\\n상담원", category_column="")
    changed = form.overrides(current, quick, groups)
    assert changed == ['data.category_column=null', 'data.system_prompt="친절한\\n상담원"',
                       'eval.tone={"column": "target_age", "levels": {"20대": "casual", "30대": "polite", "40대": '
                       '"polite", "50대 이상": "formal"}}'], changed
    schema = finetune.parameters.model_dump()
    text = json.dumps(schema, ensure_ascii=False)
    assert '"type": "null"' not in text  # no "str | None" switch whose None side reads 'Property is type "None"'
    shown = sum(len(form.GROUPS[g].model_fields) for g in form.GROUPS)
    assert shown < 40 and "encoding" not in form.GROUPS["data"].model_fields


def test_form_puts_the_common_settings_first_and_describes_every_field():
    from loraops.flows.finetune import finetune

    schema = finetune.parameters.model_dump()
    order = list(schema["properties"])
    assert order[:9] == ["data_path", "data_format", "base_model", "learning_rate", "max_steps", "lora_rank",
                         "eval_questions", "model_name", "auto_promote"]
    for name, prop in schema["properties"].items():
        assert prop.get("description") or prop.get("$ref") or prop.get("allOf"), f"{name} has no description"
    definitions = schema.get("definitions") or schema.get("$defs")
    train = next(v for k, v in definitions.items() if k.startswith("TrainSection"))
    assert "learning_rate" not in train["properties"] and "max_steps" not in train["properties"]
    for group in definitions.values():
        for field, prop in group.get("properties", {}).items():
            assert prop.get("description") or prop.get("$ref") or prop.get("allOf") or field in {"heads", "hidden",
                   "intermediate", "layers", "vocab_size"}, f"{field} has no description"


def test_code_defaults_equal_params_yaml():
    """One source of defaults: a key left out of params.yaml means the same as the file's value."""
    from loraops.core.config import flatten

    code = flatten(Params().model_dump(mode="json"))
    assert code == flatten(load_params(REPO / "params.yaml").model_dump(mode="json"))
    # and every key is written out, so a user reading params.yaml sees it (the search space is free-form)
    written = set(flatten(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))))
    assert not {k for k in code if not k.startswith("sweep.space.")} - written



def test_dvc_code_deps_are_the_import_closure_of_each_stage():
    """dvc.yaml lists exactly the loraops modules `loraops <stage>` imports, so no code change skips a stage."""
    from loraops.core.codedeps import stage_files

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in dvc["stages"].items():
        listed = sorted(d for d in stage["deps"] if d.startswith("src/loraops/") and d.endswith(".py"))
        assert listed == stage_files(name), f"dvc.yaml stage {name}: update its deps to loraops.codedeps.stage_files"
    assert {"src/loraops/core/utils.py", "src/loraops/cli/stages.py", "src/loraops/cli/__init__.py"} <= set(stage_files("prepare"))
    assert {"src/loraops/modeling/generation.py", "src/loraops/modeling/model.py", "src/loraops/judge/metrics.py"} <= set(stage_files("evaluate"))
    assert "src/loraops/stages/prepare.py" not in stage_files("evaluate")  # it reads the splits through core.readers
    assert "src/loraops/registry/versions.py" not in stage_files("evaluate")  # other commands' imports do not count
    assert "src/loraops/stages/train.py" not in stage_files("evaluate")


@pytest.mark.parametrize("override,key", [
    ("train.eval_steps=1000", "train.eval_steps"),
    ("train.logging_steps=5000", "train.logging_steps"),
    ("registry.gate.metric=cosine", "registry.gate.metric"),
    ("eval.max_samples=5", "eval.max_samples"),
    ("data.template={tone} {question}", "data.template"),
    ("train.quantization=4bit", "train.quantization"),
])
def test_cross_field_checks_fail_at_load_naming_the_key(override, key):
    extra = ["base.device=cpu"] if key == "train.quantization" else []
    metrics = ["eval.metrics=[morph_f1]"] if key == "registry.gate.metric" else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override, *extra, *metrics])


def test_template_attribute_fields_pass_the_cross_check():
    params = load_params(REPO / "params.yaml", ["data.attribute_columns=[target_age]",
                                                "data.template=[{target_age}] {category} {question}"])
    assert params.data.attribute_columns == ["target_age"]


@pytest.mark.parametrize("text", ["질문: {question}\n답변: ", "\n질문:", 'say "hi" \\d \\ end', "tab\there\\n literal"])
def test_form_line_break_escapes_round_trip(text):
    from loraops.orchestration.form import _escape, _unescape

    assert "\n" not in _escape(text) and _unescape(_escape(text)) == text


def test_a_finetune_run_is_named_after_the_model_it_trains():
    from loraops.orchestration import form

    assert form.model_name_of({"use_form": True, "model_name": "jewelry-qa"}, REPO) == "jewelry-qa"
    assert form.model_name_of({"use_form": False, "params_file": "configs/copy.yaml", "overrides": []}, REPO) == "store-copy-lora"
    assert form.model_name_of({"use_form": False, "params_file": "params.yaml",
                               "overrides": ["registry.model_name=other"]}, REPO) == "other"
    assert form.model_name_of({"use_form": False, "params_file": "missing.yaml"}, REPO) == "finetune"


def test_every_command_is_in_the_command_map_and_the_console_entry_loads_only_its_module():
    """`loraops <command>` imports only the CLI module defining it (loraops.cli.COMMANDS): the map is complete."""
    from loraops.cli import COMMANDS, _command_of, load_commands

    app = load_commands()
    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    registered |= {group.name for group in app.registered_groups}
    assert registered == set(COMMANDS)
    assert _command_of(["--project", "x", "train", "--set", "a=b"]) == "train" and _command_of(["--help"]) is None
    # the console entry ends the process itself once the exit handlers ran: the list is printed by one of them
    code = ("import atexit, sys; sys.argv = ['loraops', 'prepare', '--help']; from loraops import cli\n"
            "atexit.register(lambda: print(sorted(m for m in sys.modules if m.startswith('loraops.cli.'))))\n"
            "cli.main()")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['loraops.cli.stages']"


@pytest.mark.parametrize("stage", ["prepare", "augment", "index", "train", "evaluate"])
def test_a_stage_depends_only_on_code_it_runs(stage):
    """Editing the demo, the server, review or a CLI-only module never makes a stage stale (DVC reruns a stage only
    for the files dvc.yaml lists, and test_dvc_stage_code_deps_are_the_import_closure holds dvc.yaml to these)."""
    from loraops.core.codedeps import stage_files

    files = set(stage_files(stage))
    above = [f for f in files if f.split("/")[2] in ("registry", "review", "serving", "orchestration")]
    assert not above, f"stage {stage} depends on {above}: a layer above the stages"
    for other in ("cli/flows", "cli/models", "cli/serving", "cli/review", "core/concurrency", "modeling/sweep"):
        assert f"src/loraops/{other}.py" not in files, f"stage {stage} depends on {other}.py"
    assert ("src/loraops/judge/metrics.py" in files) == (stage in ("augment", "index", "evaluate"))


def test_the_fault_hook_is_off_unless_set_and_refuses_a_spec_it_cannot_carry_out(monkeypatch):
    from loraops.modeling import trainer

    monkeypatch.delenv(trainer.FAULT_ENV, raising=False)
    assert trainer.fault_injection() is None
    monkeypatch.setenv(trainer.FAULT_ENV, "50:wait:/tmp/go")
    assert trainer.fault_injection() is not None
    for bad in ("kill", "50", "50:explode", "x:kill"):
        monkeypatch.setenv(trainer.FAULT_ENV, bad)
        with pytest.raises(ConfigError, match="LORAOPS_FAULT_AFTER_CHECKPOINT"):
            trainer.fault_injection()


def test_a_chat_template_outside_prompts_or_a_system_turn_without_one_is_refused_before_anything_runs():
    from loraops.core.config import ConfigError, load_params

    for sets, key in ((["data.chat_template=/tmp/t.jinja"], "data.chat_template"),
                      (["data.chat_template=../t.jinja"], "data.chat_template"),
                      (["data.chat_template=none", "data.system_prompt=존댓말로 답하세요."], "data.system_prompt")):
        with pytest.raises(ConfigError, match=key):
            load_params(REPO / "params.yaml", sets)
    assert load_params(REPO / "params.yaml", ["data.chat_template=prompts/chat.jinja"]).data.chat_template == \
        "prompts/chat.jinja"


def test_retrain_settings_put_a_debounced_data_trigger_and_a_schedule_on_the_finetune_deployment(tmp_path):
    """retrain.on_data: a reactive trigger on this project's loraops.data.updated events whose run waits out the
    debounce window and trains the newest published version; retrain.schedule: a cron schedule. Off by default."""
    from loraops.flows.deploy import deployments

    plain = deployments()[0]
    assert plain.triggers == [] and not plain.schedules
    import yaml

    tree = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    tree["retrain"] |= {"on_data": True, "debounce_seconds": 90, "paths": ["data/raw/interior_qa.csv"],
                        "schedule": "0 2 * * *"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    finetune = deployments(str(path))[0]
    [trigger] = finetune.triggers
    assert trigger.expect == {"loraops.data.updated"} and trigger.posture == "Reactive" and trigger.threshold == 1
    assert trigger.match.model_dump() == {"prefect.resource.id": "loraops.project.interior-qa-lora",
                                          "prefect.resource.name": "interior-qa-lora"}
    assert trigger.within.total_seconds() == trigger.schedule_after.total_seconds() == 90
    assert trigger.match_related.model_dump() == {"prefect.resource.role": "data",
                                                  "prefect.resource.name": ["data/raw/interior_qa.csv"]}
    assert trigger.parameters == {"data_revision": "published", "use_form": False, "params_file": "params.yaml"}
    assert [s.schedule.cron for s in finetune.schedules] == ["0 2 * * *"]
    tree["retrain"]["schedule"] = "every night"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigError, match="retrain.schedule 'every night' is not a cron line"):
        deployments(str(path))
