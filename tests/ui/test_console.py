"""The web console in a real headless Chromium against a real server (tiny model, keys for two
tenants and an admin): sign in, upload and refusals, merge and delete, a training job whose loss
curve grows while it runs, base vs adapter streamed side by side, tenant isolation, keyboard and
phone width. Screenshots go to docs/screenshots with UPDATE_SCREENSHOTS=1 (tests/ui/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from playwright.sync_api import expect

from server.app import create_app
from tests.api.adapter_http import ADMIN, ALICE, BOB, auth, build_adapter, load_tiny, upload, write_keys
from tests.harness import REPO_ROOT, TRAIN_DATA, cpu_settings, gate_engine, running_server, wait_until
from tests.ui.conftest import PHONE

STEP_DELAY_S = 0.1  # paces training steps so the page's polls see the curve grow


class Pacer:
    """An engine step hook that slows every pass while on (the tiny model trains too fast to watch)."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self) -> None:
        if self.on:
            time.sleep(STEP_DELAY_S)


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("ui")
    settings = cpu_settings(tiny_model_dir, tmp / "store", api_keys=write_keys(tmp / "keys.json"), max_rank=32,
                            train_interleave_steps=1)
    base = load_tiny(tiny_model_dir)
    pirate = build_adapter(base, "lora_all", tmp / "pirate", seed=3, scale=0.5)
    app = create_app(settings)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        engine = app.state.services.engine
        pacer = Pacer()
        engine.loop.add_step_hook(pacer)
        for key, name in ((ALICE, "pirate"), (BOB, "bob-secret")):
            assert upload(client, name, pirate, key=key).status_code == 201
        yield SimpleNamespace(url=url, client=client, pirate=pirate, tmp=tmp, gate=gate_engine(engine), pacer=pacer)


def sign_in(page, url: str, key: str) -> None:
    page.goto(f"{url}/ui")
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#app:not([hidden])")


def adapter_row(page, adapter_id: str):
    return page.locator(f"#adapters-table tbody tr[data-adapter='{adapter_id}']")


def test_sign_in_upload_and_see_it_listed(env, open_page, screenshots: Path) -> None:
    page = open_page(env.url, expect_errors=True)
    page.goto(f"{env.url}/ui")
    page.screenshot(path=screenshots / "sign-in.png")
    page.fill("#api-key", "not-a-real-key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("invalid API key (HTTP 401)")
    sign_in(page, env.url, ALICE)
    assert page.inner_text("#who-text") == "Tenant alice" and page.locator("#tenant-pick").is_hidden()
    page.fill("#upload-id", "uploaded")
    page.set_input_files("#upload-config", str(env.pirate / "adapter_config.json"))
    page.set_input_files("#upload-weights", str(env.pirate / "adapter_model.safetensors"))
    page.click("#upload-form button[type=submit]")
    row = adapter_row(page, "uploaded")
    row.wait_for()
    cells = dict(zip(["id", "tenant", "type", "rank", "targets", "size", "version", "mode", "resident"],
                     row.locator("th, td").all_inner_texts()))
    assert cells["type"] == "lora (rslora)" and cells["rank"] == "12" and cells["version"] == "1"
    assert cells["mode"] == "unmerged" and "q_proj" in cells["targets"] and cells["size"].endswith("KiB")
    assert page.locator("#upload-progress").get_attribute("value") == "100"  # XHR upload progress reached the end
    assert adapter_row(page, "pirate").count() == 1
    page.screenshot(path=screenshots / "adapters.png", full_page=True)


def test_a_refused_upload_shows_the_servers_message(env, open_page) -> None:
    config = json.loads((env.pirate / "adapter_config.json").read_text())
    config["target_modules"] = ["q_projection"]
    bad = env.tmp / "bad_config.json"
    bad.write_text(json.dumps(config))
    files = {"config": ("adapter_config.json", bad.read_bytes()),
             "weights": ("adapter_model.safetensors", (env.pirate / "adapter_model.safetensors").read_bytes())}
    expected = env.client.put("/v1/adapters/refused", files=files, headers=auth(ALICE))
    assert expected.status_code == 422
    page = open_page(env.url, expect_errors=True)
    sign_in(page, env.url, ALICE)
    page.fill("#upload-id", "refused")
    page.set_input_files("#upload-config", str(bad))
    page.set_input_files("#upload-weights", str(env.pirate / "adapter_model.safetensors"))
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-error")).to_have_text(f"{expected.json()['error']['message']} (HTTP 422)")
    assert adapter_row(page, "refused").count() == 0


def test_merge_unmerge_and_delete_with_confirmation(env, open_page) -> None:
    assert upload(env.client, "doomed", env.pirate, key=ALICE).status_code == 201
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    page.click("button[aria-label='Merge pirate']")
    page.wait_for_selector("#adapters-table tr[data-adapter='pirate'] td[data-label=Mode]:text-is('merged')")
    page.click("button[aria-label='Unmerge pirate']")
    page.wait_for_selector("#adapters-table tr[data-adapter='pirate'] td[data-label=Mode]:text-is('unmerged')")
    page.once("dialog", lambda d: d.dismiss())
    page.click("button[aria-label='Delete doomed']")
    assert adapter_row(page, "doomed").count() == 1
    page.once("dialog", lambda d: d.accept())
    page.click("button[aria-label='Delete doomed']")
    adapter_row(page, "doomed").wait_for(state="detached")
    assert env.client.get("/v1/adapters/doomed", headers=auth(ALICE)).status_code == 404


def points(page) -> int:
    return int(page.get_attribute("#loss-chart", "data-points") or 0)


def test_training_job_loss_curve_grows_while_it_runs(env, open_page, screenshots: Path) -> None:
    steps = 24
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    page.click("#tab-training")
    page.fill("#train-id", "parrot")
    page.fill("#train-rank", "4")
    page.fill("#train-steps", str(steps))
    page.fill("#train-lr", "0.01")
    page.fill("#train-batch", "2")
    page.fill("#train-text", "\n".join(json.dumps(e) for e in TRAIN_DATA))
    env.pacer.on = True
    try:
        page.click("#train-form button[type=submit]")
        assert wait_until(lambda: points(page) >= 1, timeout=30)
        env.gate.arm()  # park the trainer between steps: the page must show a partial curve
        assert env.gate.entered.wait(30)
        page.wait_for_timeout(1000)  # two polls: the page shows where the job is parked
        held = points(page)
        assert 1 <= held < steps
        assert page.get_attribute("#job-card", "data-status") == "running"
        assert int(page.get_attribute("#job-progress", "value")) == held
        assert page.locator("#loss-chart polyline").count() == 1 and page.locator("#loss-chart circle").count() == held
        page.screenshot(path=screenshots / "training.png", full_page=True)
    finally:
        env.gate.release()
        env.pacer.on = False
    page.wait_for_selector("#job-card[data-status=succeeded]", timeout=60_000)
    assert points(page) == steps > held
    assert f"of {steps} steps" in page.get_attribute("#loss-chart", "aria-label")
    page.click("#job-try")
    page.wait_for_selector("#tab-playground[aria-selected=true]")
    page.wait_for_selector("#play-target-list input[value=parrot]:checked")


def test_a_job_is_cancelled_from_its_card(env, open_page) -> None:
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    page.click("#tab-training")
    page.fill("#train-id", "never")
    page.fill("#train-steps", "500")
    page.fill("#train-text", json.dumps(TRAIN_DATA[0]))
    env.gate.arm()  # the engine parks before the job can finish
    try:
        page.click("#train-form button[type=submit]")
        page.wait_for_selector("#job-card[data-status=queued], #job-card[data-status=running]")
        page.click("#job-cancel")
    finally:
        env.gate.release()
    page.wait_for_selector("#job-card[data-status=cancelled]")
    assert page.is_hidden("#job-cancel") and page.is_hidden("#job-try")
    assert env.client.get("/v1/adapters/never", headers=auth(ALICE)).status_code == 404


def test_playground_streams_base_and_adapter_side_by_side(env, open_page, screenshots: Path) -> None:
    prompt, n = "Say hi:", 16
    expected = {}
    for adapter in (None, "pirate"):
        r = env.client.post("/generate", headers=auth(ALICE), json={
            "prompt": prompt, "adapter_id": adapter, "max_new_tokens": n, "temperature": 0})
        expected[adapter or "base"] = r.json()["text"]
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    page.click("#tab-playground")
    page.fill("#play-prompt", prompt)
    page.fill("#play-max", str(n))
    page.check("#play-target-list input[value=pirate]")
    assert page.is_checked("#play-target-list input[value='']")  # the base, checked by default
    page.click("#play-run")
    for target in ("base", "pirate"):
        page.wait_for_selector(f".pane[data-target='{target}'][data-done=true]")
    for target, text in expected.items():
        out = page.locator(f".pane[data-target='{target}'] pre.out")
        assert out.inner_text() == text
        assert int(out.get_attribute("data-chunks")) > 1  # streamed: many events, not one answer
    boxes = [page.locator(f".pane[data-target='{t}']").bounding_box() for t in ("base", "pirate")]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] < boxes[1]["x"]  # side by side
    page.screenshot(path=screenshots / "playground.png", full_page=True)
    run_snippets(env.url, page.inner_text("#snippet-curl"), page.inner_text("#snippet-python"), expected)


def run_snippets(url: str, curl: str, python: str, expected: dict[str, str]) -> None:
    """The snippets shown are what ran: executed here, they give the same texts."""
    environment = {**os.environ, "LORAPLEX_API_KEY": ALICE, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, env=environment, timeout=60)
    events = [json.loads(line[6:]) for line in out.stdout.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e.get("text", "") for e in events) == expected["base"] + expected["pirate"], out.stderr
    out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, env=environment,
                         timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"--- base\n{expected['base']}\n--- pirate\n{expected['pirate']}\n"


def test_another_tenants_adapter_is_invisible_and_admins_switch(env, open_page, screenshots: Path) -> None:
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    adapter_row(page, "pirate").wait_for()
    page.click("#tab-playground")
    page.wait_for_selector("#play-target-list input[value=pirate]")
    assert "bob-secret" not in page.content()
    admin = open_page(env.url)
    sign_in(admin, env.url, ADMIN)
    assert admin.inner_text("#who-text") == "Admin key (tenant ops)" and admin.is_visible("#admin-note")
    admin.locator("#adapters-table tr[data-adapter='bob-secret'][data-tenant=bob]").wait_for()
    assert admin.locator("#adapters-table tr[data-tenant=alice]").count() >= 1
    admin.wait_for_selector("#tenant-select option[value=bob]", state="attached")
    admin.select_option("#tenant-select", "bob")
    wait_until(lambda: admin.locator("#adapters-table tr[data-tenant=alice]").count() == 0, timeout=10)
    assert admin.locator("#adapters-table tbody tr").all_inner_texts() and \
        {r.get_attribute("data-tenant") for r in admin.locator("#adapters-table tbody tr").all()} == {"bob"}
    admin.screenshot(path=screenshots / "admin.png", full_page=True)


def test_tabs_work_from_the_keyboard(env, open_page) -> None:
    page = open_page(env.url)
    sign_in(page, env.url, ALICE)
    page.focus("#tab-adapters")
    for key, tab in (("ArrowRight", "training"), ("ArrowRight", "playground"), ("ArrowRight", "adapters"),
                     ("End", "playground"), ("Home", "adapters"), ("ArrowLeft", "playground")):
        page.keyboard.press(key)
        assert page.evaluate("document.activeElement.id") == f"tab-{tab}"
        assert page.get_attribute(f"#tab-{tab}", "aria-selected") == "true"
        assert page.is_visible(f"#panel-{tab}")
    assert page.locator("[role=tab][aria-selected=true]").count() == 1
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, progress')]
        .filter((e) => !e.labels?.length && !e.getAttribute('aria-label')).map((e) => e.id)""")
    assert unlabelled == []
    assert page.locator("[role=tab][tabindex='0']").count() == 1  # one tab stop for the list


def test_phone_width_has_no_sideways_scroll(env, open_page, screenshots: Path) -> None:
    page = open_page(env.url, viewport=PHONE)
    sign_in(page, env.url, ALICE)
    adapter_row(page, "pirate").wait_for()
    for tab in ("training", "playground", "adapters"):
        page.click(f"#tab-{tab}")
        expect(page.locator(f"#panel-{tab}")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], tab
    assert adapter_row(page, "pirate").is_visible()
    page.screenshot(path=screenshots / "adapters-phone.png", full_page=True)
