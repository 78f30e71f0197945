"""Review before use: with registry.gate.require_approval a promotion the gate passes waits for a reviewer in the
Prefect UI, and only an approval moves production. Driven through the real Resume form in Chromium."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ended_with_an_outcome, make_workspace, prefect_api, prefect_with_deployments, small_loop_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def approval_project(tmp_path_factory):
    """A project whose gate needs a reviewer, served on a Prefect server, with v1 registered (not promoted)."""
    tmp = tmp_path_factory.mktemp("approval")
    ws = make_workspace(tmp / "ws", small_loop_overrides("registry.gate.require_approval=true",
                                                                 "retrain.on_data=true", "retrain.debounce_seconds=20"))
    with prefect_with_deployments(tmp, ws) as served:
        done = _loraops(served, "run")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "registered interior-qa-lora v1" in done.stdout and "reviewer's approval" in done.stdout
        yield served


def _loraops(served: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=served["ws"], capture_output=True,
                          text=True, env={**served["env"], "HF_HUB_OFFLINE": "1"}, timeout=900)


def _registry(served: dict) -> dict:
    code = ("import json; from loraops.registry import versions as registry; c = registry.mlflow_client();"
            "print(json.dumps({'production': registry.alias_version(c, 'interior-qa-lora', 'production'),"
            " 'trail': registry.audit_trail('interior-qa-lora')}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=served["ws"], capture_output=True, text=True,
                          env=served["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _answer_in_the_ui(served: dict, link: str, decision: str, reviewer: str, comment: str, shot: str) -> str:
    """Open the paused run, press Resume, try an empty form (refused, naming the fields), then answer."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(link)
            page.get_by_role("button", name="Resume").first.click(timeout=60_000)
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Sample answers per slice").wait_for(timeout=30_000)
            request = dialog.inner_text()
            # the reviewer reads each candidate answer inside the dialog, without scrolling sideways
            quote = dialog.locator("blockquote", has_text="candidate v1:").first  # one question's answers
            frame, answer = dialog.bounding_box(), quote.bounding_box()
            assert frame and answer and answer["x"] + answer["width"] <= frame["x"] + frame["width"] + 1, (frame, answer)
            wide = dialog.evaluate("e => [...e.querySelectorAll('*')].filter(c => c.scrollWidth > c.clientWidth + 1"
                                   " && getComputedStyle(c).overflowX !== 'visible').length")
            assert wide == 0, f"{wide} element(s) of the Resume dialog scroll sideways"
            dialog.get_by_role("button", name="Submit").click()
            dialog.get_by_text("'reviewer' is a required property").wait_for(timeout=10_000)
            empty = dialog.inner_text()
            select = dialog.locator(".p-select-button__control")
            for _ in range(3):  # on a loaded machine a click can land while the list is still opening
                select.press("ArrowDown")  # the select opens from the keyboard
                page.get_by_role("option", name=decision, exact=True).click()
                if decision in select.inner_text():
                    break
                page.keyboard.press("Escape")
            assert decision in select.inner_text(), dialog.inner_text()
            areas = dialog.locator("textarea")
            areas.nth(0).fill(reviewer)
            areas.nth(1).fill(comment)
            # the form checks its values again (on the server, a second after the last change) while it shows errors:
            # the errors going away is the sign it holds what was typed; submitting before that can send stale values
            dialog.get_by_text("is a required property").first.wait_for(state="hidden", timeout=30_000)
            page.screenshot(path=str(served["tmp"] / shot))
            toasts: list[str] = []
            for _ in range(3):  # a reviewer whose Submit met a busy server (an error toast, the form still open) submits again
                dialog.get_by_role("button", name="Submit").click()
                try:
                    dialog.wait_for(state="hidden", timeout=40_000)
                    break
                except Exception:
                    toasts.extend(page.locator(".p-toast-container").all_inner_texts())
            else:
                page.screenshot(path=str(served["tmp"] / f"stuck-{shot}"))
                raise AssertionError(f"the Resume form did not close; toasts: {toasts}; the form's fields and errors: "
                                     f"{dialog.inner_text().split('Decision', 1)[-1]}; textareas: "
                                     f"{[areas.nth(i).input_value() for i in range(areas.count())]}")
        finally:
            browser.close()
    assert "'decision' is a required property" in empty
    return request


def _badge(served: dict, link: str, name: str, shot: str) -> str:
    """The background colour of the flow run page's state badge reading ``name``, as Chromium draws it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(link)
            badge = page.locator(".state-badge", has_text=name).first
            badge.wait_for(timeout=60_000)
            page.screenshot(path=str(served["tmp"] / shot))
            return str(badge.evaluate("e => getComputedStyle(e).backgroundColor"))
        finally:
            browser.close()


def _dashboard_failed(served: dict, expected: int) -> int:
    """The dashboard's first count under "Flow Runs" (failed and crashed runs, the red tab), as Chromium shows it once
    it reads ``expected`` or after a minute: the counts fill in after the card, later on a loaded machine."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{served['ui']}/dashboard")
            page.get_by_text("total", exact=True).first.wait_for(timeout=60_000)
            deadline = time.time() + 60
            while True:
                text = page.inner_text("body")
                counts = [int(word) for word in text.split("total", 1)[1].split() if word.isdigit()]
                if (counts and counts[0] == expected) or time.time() > deadline:
                    break
                page.wait_for_timeout(1000)
            page.screenshot(path=str(served["tmp"] / "dashboard.png"))
        finally:
            browser.close()
    return counts[0] if counts else -1


def _events(served: dict, prefix: str, at_least: int, seconds: float = 60) -> list[dict]:
    """The server's event feed (what the UI's Event Feed lists) for names starting with ``prefix``, oldest first,
    once it holds ``at_least`` of them (the server stores events in batches)."""
    deadline = time.time() + seconds
    while True:
        found = prefect_api("POST", f"{served['api']}/events/filter", json={
            "filter": {"event": {"prefix": [prefix]}, "order": "ASC"}, "limit": 50})["events"]
        if len(found) >= at_least or time.time() > deadline:
            return found
        time.sleep(1)


def _wait_final(served: dict, flow_run: str, seconds: float = 180) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        run = prefect_api("GET", f"{served['api']}/flow_runs/{flow_run}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run} still {run['state_type']}")


def _promote_and_wait(served: dict, *args: str) -> tuple[str, str]:
    done = _loraops(served, "promote", *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "waiting for a reviewer's approval in the Prefect UI: " in done.stdout, done.stdout
    link = done.stdout.split("Prefect UI: ", 1)[1].split()[0]
    assert link.startswith(served["ui"] + "/runs/flow-run/")
    flow_run = link.rsplit("/", 1)[1]
    paused = prefect_api("GET", f"{served['api']}/flow_runs/{flow_run}")
    assert paused["state_type"] == "PAUSED" and paused["name"].startswith("interior-qa-lora · promote · "), paused["name"]
    return link, flow_run


def test_a_rejection_moves_nothing_and_an_approval_promotes_both_audited(approval_project):
    served = approval_project
    link, flow_run = _promote_and_wait(served)
    request = _answer_in_the_ui(served, link, "reject", "박검토", "톤이 아직 거칠어요", "reject.png")
    assert "Approve interior-qa-lora v1 for production?" in request and "category = " in request
    rejected = _wait_final(served, flow_run)
    assert (rejected["state_type"], rejected["state_name"]) == ("FAILED", "Rejected")  # not a success, in any screen
    rejected_link = link
    state = _registry(served)
    assert state["production"] is None
    assert [(a["action"], a["to"], a["reviewer"], a["comment"]) for a in state["trail"]] == [
        ("reject", "1", "박검토", "톤이 아직 거칠어요")]

    link, flow_run = _promote_and_wait(served, "--set", "registry.gate.approval_timeout_hours=48")
    request = _answer_in_the_ui(served, link, "approve", "김승인", "샘플 확인 완료", "approve.png")
    assert "No answer within 48 h rejects" in request  # --set travels to the promote deployment
    approved = _wait_final(served, flow_run)
    assert (approved["state_type"], approved["state_name"]) == ("COMPLETED", "Approved")
    red, green = _badge(served, rejected_link, "Rejected", "rejected-badge.png"), _badge(served, link, "Approved",
                                                                                        "approved-badge.png")
    assert red != green, (red, green)  # the rejection is not drawn in the success colour
    failed = [r for r in prefect_api("POST", f"{served['api']}/flow_runs/filter", json={})
              if r["state_type"] in ("FAILED", "CRASHED")]
    assert failed and _dashboard_failed(served, len(failed)) == len(failed)  # the rejection counts as not a success
    state = _registry(served)
    assert state["production"] == "1"
    assert [(a["action"], a["to"], a["reviewer"], a["comment"]) for a in state["trail"]][-1] == (
        "promote", "1", "김승인", "샘플 확인 완료")
    moves = _events(served, "loraops.model.", 2)  # each audited decision is an event automations can follow
    assert [e["event"] for e in moves] == ["loraops.model.rejected", "loraops.model.promoted"], moves
    assert {e["resource"]["prefect.resource.id"] for e in moves} == {"loraops.model.interior-qa-lora"}
    assert (moves[1]["payload"]["to"], moves[1]["payload"]["from"], moves[1]["payload"]["reviewer"]) == (
        "1", None, "김승인") and moves[0]["payload"]["comment"] == "톤이 아직 거칠어요"


def test_promote_without_a_prefect_server_says_where_approval_happens(approval_project, tmp_path):
    env = {k: v for k, v in approval_project["env"].items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "loraops.cli", "promote"], cwd=approval_project["ws"],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "registry.gate.require_approval: a reviewer approves in the Prefect UI" in done.stderr
    assert os.path.exists(approval_project["ws"] / "params.yaml")


def _finetune_runs(served: dict) -> list[dict]:
    runs = prefect_api("POST", f"{served['api']}/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_ASC"})
    return [r for r in runs if r["name"].startswith("interior-qa-lora · new data · ")]


def _wait_runs(served: dict, count: int, seconds: float = 600) -> list[dict]:
    deadline = time.time() + seconds
    while True:
        runs = _finetune_runs(served)
        if len(runs) >= count and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        assert time.time() < deadline, [(r["name"], r["state_name"]) for r in runs]
        time.sleep(3)


def _version_lineage(served: dict, version: str) -> dict:
    code = ("import json; from loraops.registry import versions as registry; from loraops.registry.reproduce import "
            "_lineage; c = registry.mlflow_client(); v = c.get_model_version('interior-qa-lora', '" + version + "');"
            "print(json.dumps(_lineage(v.run_id)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=served["ws"], capture_output=True, text=True,
                          env=served["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_published_data_version_retrains_once_per_burst_and_the_same_version_again_changes_nothing(
        approval_project):
    """`loraops data publish` sends loraops.data.updated (path, git revision, DVC hash); with `loraops hooks install`
    a commit of a changed .dvc file publishes it. The finetune deployment's trigger (retrain.on_data) starts one run
    for the burst, on the newest version: it registers a version whose lineage names that revision and data hash.
    Publishing the same version again ends Unchanged. A path that is not a committed DVC version is refused."""
    import yaml

    served, ws = approval_project, approval_project["ws"]
    data = "data/raw/interior_qa.csv"
    refused = _loraops(served, "data", "publish", "data/raw/nothing.csv")
    assert refused.returncode == 2 and "data/raw/nothing.csv: not tracked by DVC" in refused.stderr, refused.stderr
    done = _loraops(served, "data", "publish", data, "--json")  # the version v1 was trained on: the burst's first
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [first] = json.loads(done.stdout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    tracked = yaml.safe_load((ws / f"{data}.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
    assert (first["path"], first["revision"], first["md5"]) == (data, head, tracked)

    hook = _loraops(served, "hooks", "install")
    assert hook.returncode == 0 and (ws / ".git/hooks/post-commit").exists(), hook.stderr
    with (ws / data).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    october = [row | {"id": f"OCT_{i:03d}", "질문_1": f"10월 문의: {row['질문_1']}", "질문_2": f"10월 문의: {row['질문_2']}"}
               for i, row in enumerate(rows[:24])]  # new questions: what the stages see changes
    with (ws / data).open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + october)
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "add", "-q", data], cwd=ws, check=True, env=served["env"])
    uncommitted = _loraops(served, "data", "publish", data)
    assert uncommitted.returncode == 2 and "not committed" in uncommitted.stderr, uncommitted.stderr
    commit = subprocess.run(["git", "commit", "-qam", "data: October questions"], cwd=ws, capture_output=True,
                            text=True, env={**served["env"], "HF_HUB_OFFLINE": "1"})
    assert commit.returncode == 0, commit.stderr
    published = _events(served, "loraops.data.updated", 2)
    new_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    new_md5 = yaml.safe_load((ws / f"{data}.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
    assert [(e["payload"]["revision"], e["payload"]["md5"]) for e in published] == [(head, tracked), (new_head, new_md5)]
    assert published[1]["resource"]["prefect.resource.id"] == "loraops.project.interior-qa-lora" and new_md5 != tracked

    [run] = _wait_runs(served, 1)  # two publishes inside the debounce window: one run, on the newest version
    assert ended_with_an_outcome(run), (run["state_name"], served["log"].read_text()[-4000:])
    lineage = _version_lineage(served, "2")
    assert lineage["git_commit"] == new_head and lineage["data_md5"][data] == new_md5, lineage

    again = _loraops(served, "data", "publish", data)  # the same version once more
    assert again.returncode == 0, again.stderr
    runs = _wait_runs(served, 2)
    assert len(runs) == 2 and runs[1]["state_name"] == "Unchanged", [(r["name"], r["state_name"]) for r in runs]
