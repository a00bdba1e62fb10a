"""The web page, clicked through in a real headless Chromium against the real stack (keys on): the key, generate with
live progress and the gallery, errors that name the field, the queue's cancel, a fine-tune from a zip with its loss
curve and validation images, and adapters (download, share, delete, import)."""

from __future__ import annotations

import io
import re
import time
import zipfile

import httpx
from _support.fixtures import png_bytes, shapes_dataset_zip, wait_job
from _support.servers import Stack


def _state(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/jobs/{job_id}").json()["state"]


def _wait_state(client: httpx.Client, job_id: str, states: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (state := _state(client, job_id)) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(0.1)
    return state


def _finetune(client: httpx.Client, name: str, steps: int = 2) -> dict:
    r = client.post("/finetune", data={"name": name, "steps": str(steps)},
                    files={"file": ("d.zip", shapes_dataset_zip(2), "application/zip")})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], timeout=120)
    assert job["state"] == "succeeded", job
    return job


def _generate(page):
    """Click Generate; the new job's live card (a locator by its job id) once the page shows it."""
    before = page.locator("#live > .job").count()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#live > .job").nth(before).wait_for()
    return page.locator(f"#live-{page.locator('#live > .job').first.get_attribute('data-job-id')}")


def _ended(card, state: str = "succeeded"):
    card.locator(f"xpath=self::*[@data-state='{state}']").wait_for()
    return card


# -- the page itself ------------------------------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_from_here_only(site, tab):
    r = httpx.get(site.base_url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text), "the page must load nothing from elsewhere"
    etag = r.headers["etag"]
    assert httpx.get(site.base_url + "/", headers={"If-None-Match": etag}).status_code == 304
    for name in ("app.js", "api.js", "app.css", "icon.svg"):
        f = httpx.get(f"{site.base_url}/ui/{name}")
        assert f.status_code == 200 and f.headers["cache-control"] == "no-cache", name
    assert httpx.get(site.base_url + "/ui/../service/main.py").status_code == 404
    assert httpx.get(site.base_url + "/ui/main.py").status_code == 404
    assert httpx.get(site.base_url + "/jobs").status_code == 401  # the API's routes are still the API's
    params = httpx.get(site.base_url + "/ui/params.json").json()
    assert params["generate"]["num_inference_steps"]["default"] == 25 and params["native_size"] == 32
    assert "euler" in params["generate"]["scheduler"]["choices"]

    tab.open()
    assert tab.requests and all(u.startswith(site.base_url + "/") for u in tab.requests), tab.requests
    for internal in (str(site.data_dir), site.redis_url):
        assert internal not in tab.page.content()


def test_the_page_asks_for_a_key_and_remembers_it(site, tab):
    tab.open()
    banner = tab.page.get_by_role("alert").filter(has_text="API key")
    assert "needs an API key" in banner.inner_text()
    tab.page.get_by_label("API key").fill("md_not-a-key")
    tab.page.get_by_role("button", name="Use key").click()
    tab.page.wait_for_selector("#banner:has-text('refused')")
    tab.use_key(site.tokens["alice"], "alice")
    assert tab.page.locator("#banner").is_hidden()
    tab.page.reload()
    tab.page.wait_for_selector("#whoami:has-text('alice')")  # kept in localStorage
    tab.page.get_by_role("button", name="Forget").click()
    tab.page.wait_for_selector("#banner:has-text('needs an API key')")


def test_open_mode_needs_no_key(tmp_path, browser):
    s = Stack(tmp_path, MINIDALLE_AUTH="open")  # redis and the API only: nothing here needs a worker
    try:
        context = browser.new_context()
        page = context.new_page()
        page.goto(s.base_url + "/#adapters")
        page.wait_for_selector("body[data-ready='1']")
        assert "no key needed" in page.locator("#whoami").inner_text()
        assert page.locator("#banner").is_hidden()
        assert page.get_by_role("tab", name="Adapters").get_attribute("aria-selected") == "true"
        assert page.locator("#adapters-empty").is_visible()
        context.close()
    finally:
        s.stop()


# -- generate, gallery, queue ---------------------------------------------------------------------------------------
def test_generate_shows_progress_and_images_then_the_gallery_reuses_them(site, alice):
    page = alice.page
    page.get_by_label("Prompt", exact=True).fill("a green triangle on a white background")
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Images").fill("2")
    page.get_by_label("Steps", exact=True).fill("4")
    page.get_by_label("Guidance scale").fill("5")
    page.get_by_label("Seed", exact=True).fill("11")
    page.get_by_label("Scheduler").select_option("euler")
    card = _ended(_generate(page))
    job_id = card.get_attribute("data-job-id")
    job = site.as_user["alice"].get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["request"]["seed"] == 11 and job["request"]["scheduler"] == "euler"
    assert job["request"]["negative_prompt"] == "blurry" and job["request"]["guidance_scale"] == 5
    bar = card.locator("progress")
    assert bar.get_attribute("max") == "4" and bar.evaluate("b => b.value") == 4
    assert card.locator(".seed").all_inner_texts() == ["seed 11", "seed 12"]
    images = card.locator("img")
    images.nth(1).locator("xpath=self::*[not(contains(@class, 'loading'))]").wait_for()
    # the tiny model's 32×32 pixels, enlarged 5× without smoothing, fetched with the key (blob URLs)
    for img in images.all():
        shown = img.evaluate("i => [i.naturalWidth, i.getBoundingClientRect().width,"
                             " getComputedStyle(i).imageRendering, i.src.slice(0, 5)]")
        assert shown == [32, 160, "pixelated", "blob:"], shown

    page.get_by_role("tab", name="Gallery").click()
    photos = page.locator(f"#gallery .photo[data-job-id='{job_id}']")
    photos.nth(1).wait_for()
    assert photos.count() == 2
    assert [p.get_attribute("data-seed") for p in photos.all()] == ["11", "12"]
    second = photos.nth(1)
    assert "a green triangle on a white background" in second.inner_text()
    params = dict(zip(second.locator("dt").all_inner_texts(), second.locator("dd").all_inner_texts(), strict=True))
    assert params["seed"] == "12" and params["steps"] == "4" and params["scheduler"] == "euler"
    assert params["size"] == "32×32" and params["negative"] == "blurry"

    second.get_by_role("button", name=re.compile("Use these settings again")).click()
    assert page.get_by_role("tab", name="Generate").get_attribute("aria-selected") == "true"
    assert page.get_by_label("Prompt", exact=True).input_value() == "a green triangle on a white background"
    assert page.get_by_label("Seed", exact=True).input_value() == "12"
    assert page.get_by_label("Images").input_value() == "1"
    assert page.get_by_label("Steps", exact=True).input_value() == "4"
    assert page.get_by_label("Scheduler").input_value() == "euler"
    assert page.get_by_label("Negative prompt").input_value() == "blurry"
    again = _ended(_generate(page))  # the same image again, alone
    assert again.locator(".seed").all_inner_texts() == ["seed 12"]


def test_the_diffusion_prior_and_variations_from_the_form(site, alice, tmp_path):
    page = alice.page
    page.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    page.get_by_label("Steps", exact=True).fill("3")
    page.get_by_text("Prior and variations").click()
    page.get_by_label("Prior", exact=True).select_option("diffusion")
    page.get_by_label("Prior steps").fill("4")
    card = _ended(_generate(page))
    job = site.as_user["alice"].get(f"/jobs/{card.get_attribute('data-job-id')}").json()
    assert job["request"]["prior"] == "diffusion" and job["request"]["prior_num_inference_steps"] == 4
    # an image chosen: Generate makes variations of it (a multipart POST /variations), the prompt optional
    source = tmp_path / "red.png"
    source.write_bytes(png_bytes((220, 30, 30)))
    page.get_by_label("Prior", exact=True).select_option("mlp")
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_label("Variations of an image").set_input_files(source)
    card = _ended(_generate(page))
    assert "variations of red.png" in card.inner_text()
    job = site.as_user["alice"].get(f"/jobs/{card.get_attribute('data-job-id')}").json()
    assert job["request"]["image_id"] and job["request"]["num_inference_steps"] == 3
    assert card.locator("img").count() == 1


def test_errors_are_shown_next_to_the_field_they_name(alice):
    page = alice.page
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps", exact=True).fill("100000")
    page.get_by_role("button", name="Generate", exact=True).click()
    error = page.locator("#gen-num_inference_steps-error")
    error.wait_for()
    assert "num_inference_steps" in page.locator("#generate-error").inner_text()
    assert page.get_by_label("Steps", exact=True).get_attribute("aria-invalid") == "true"
    assert page.locator("#live > .job").count() == 0  # nothing was queued

    page.get_by_label("Steps", exact=True).fill("4")
    page.get_by_label("Prompt", exact=True).fill("   ")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#gen-prompt-error").wait_for()
    assert "blank" in page.locator("#gen-prompt-error").inner_text()
    assert error.count() == 0  # the old one is gone


def test_the_queue_cancels_a_running_and_a_queued_job(site, alice):
    page = alice.page
    page.get_by_label("Prompt", exact=True).fill("a long one")
    page.get_by_label("Images").fill("2")
    page.get_by_label("Steps", exact=True).fill("600")
    running_id = _generate(page).get_attribute("data-job-id")
    page.get_by_label("Steps", exact=True).fill("599")  # not batched with the first: it waits behind it
    queued_id = _generate(page).get_attribute("data-job-id")
    api = site.as_user["alice"]
    assert _wait_state(api, running_id, {"running"}) == "running"

    page.get_by_role("tab", name="Queue").click()
    page.locator(f"#queue tr[data-job-id='{running_id}'][data-state='running']").wait_for()
    page.locator(f"#queue tr[data-job-id='{queued_id}'][data-state='queued']").wait_for()
    assert page.locator("#queue-count").inner_text() == "2"
    page.get_by_role("button", name=f"Cancel job {queued_id}").click()
    page.get_by_role("button", name=f"Cancel job {running_id}").click()
    for job_id in (queued_id, running_id):
        assert _wait_state(api, job_id, {"succeeded", "failed", "cancelled"}) == "cancelled"
    page.locator("#queue-empty").wait_for()  # the queue's table empties as it is polled
    page.get_by_role("tab", name="Generate").click()
    for job_id in (queued_id, running_id):
        page.locator(f"#live-{job_id}[data-state='cancelled']").wait_for()


# -- fine-tune --------------------------------------------------------------------------------------------------------
def test_a_finetune_from_a_zip_shows_its_loss_curve_and_validation_images(site, alice, tmp_path):
    data = tmp_path / "squares.zip"
    data.write_bytes(shapes_dataset_zip(4))
    page = alice.page
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Dataset (zip)").set_input_files(data)
    page.get_by_label("Adapter name").fill("page-squares")
    page.get_by_label("Training steps").fill("8")
    page.get_by_label("Checkpoint every").fill("4")
    page.get_by_label("Validation prompts (one a line)").fill("a red square\na blue square")
    page.get_by_text("Training settings").click()
    page.get_by_label("Rank").fill("4")
    page.get_by_label("Train the priors").uncheck()
    page.get_by_role("button", name="Start fine-tune").click()
    page.locator("#ft-live[data-state='succeeded']").wait_for(timeout=120_000)

    job_id = page.locator("#ft-live").get_attribute("data-job-id")
    job = site.as_user["alice"].get(f"/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["request"]["rank"] == 4 and job["request"]["train_prior"] is False
    assert job["request"]["validation_prompts"] == ["a red square", "a blue square"]
    curve = page.locator("#ft-curve")
    assert curve.get_attribute("data-points") == "8"  # one loss per step
    assert len(curve.locator("polyline.loss").get_attribute("points").split()) == 8
    assert page.locator("#ft-progress").evaluate("b => [b.value, b.max]") == [8, 8]
    rows = page.locator("#ft-validation .val-row")
    assert [r.get_attribute("data-step") for r in rows.all()] == ["4", "8"]
    for img in page.locator("#ft-validation img").all():
        img.locator("xpath=self::*[not(contains(@class, 'loading'))]").wait_for()
        assert img.evaluate("i => [i.naturalWidth, i.getBoundingClientRect().width]") == [32, 128]
    assert page.locator("#ft-validation img").count() == 4
    listed = {a["name"]: a for a in site.as_user["alice"].get("/adapters").json()["adapters"]}
    assert listed["page-squares"]["mine"] and listed["page-squares"]["steps"] == 8

    # "use it in Generate" puts it in the generate form's adapters, with a scale
    page.get_by_role("button", name="Use it in Generate").click()
    assert page.get_by_label("Scale of page-squares").input_value() == "1"
    page.get_by_label("Scale of page-squares").fill("0.5")
    page.get_by_label("Prompt", exact=True).fill("a red square")
    page.get_by_label("Steps", exact=True).fill("3")
    card = _ended(_generate(page))
    made = site.as_user["alice"].get(f"/jobs/{card.get_attribute('data-job-id')}").json()
    assert made["request"]["adapters"] == [{"name": "page-squares", "scale": 0.5}]


def test_a_finetune_error_names_the_field(alice, tmp_path):
    page = alice.page
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Adapter name").fill("no-zip")
    page.get_by_role("button", name="Start fine-tune").click()
    page.locator("#ft-file-error").wait_for()
    assert "file" in page.locator("#finetune-error").inner_text()


# -- adapters ---------------------------------------------------------------------------------------------------------
def test_adapters_download_share_delete_and_import(site, alice, tmp_path):
    alices, bobs = site.as_user["alice"], site.as_user["bob"]
    _finetune(alices, "alices-lora")
    _finetune(bobs, "bobs-lora")
    assert bobs.patch("/adapters/bobs-lora", json={"visibility": "public"}).status_code == 200
    page = alice.page
    page.get_by_role("tab", name="Adapters").click()
    mine = page.locator("#adapters tr[data-name='alices-lora']")
    shared = page.locator("#adapters tr[data-name='bobs-lora']")
    mine.wait_for()
    assert "mine" in mine.inner_text() and "private" in mine.inner_text()
    assert "shared with you" in shared.inner_text() and "public" in shared.inner_text()
    assert shared.get_by_role("button", name=re.compile("Delete|Share")).count() == 0  # read-only for alice

    with page.expect_download() as got:
        page.get_by_role("button", name="Download alices-lora (diffusers)").click()
    lora = tmp_path / "alices.safetensors"
    got.value.save_as(lora)
    expected = alices.get("/adapters/alices-lora/download", params={"file": "pytorch_lora_weights.safetensors"})
    assert lora.read_bytes() == expected.content and got.value.suggested_filename.endswith(".safetensors")
    with page.expect_download() as got:
        page.get_by_role("button", name="Download alices-lora (zip)").click()
    names = zipfile.ZipFile(io.BytesIO(open(got.value.path(), "rb").read())).namelist()
    assert "alices-lora/adapter.safetensors" in names and got.value.suggested_filename == "alices-lora.zip"

    page.get_by_role("button", name="Share alices-lora").click()
    page.locator("#adapters tr[data-name='alices-lora'] .badge.public").wait_for()
    assert "alices-lora" in {a["name"] for a in bobs.get("/adapters").json()["adapters"]}

    page.get_by_label("LoRA file").set_input_files(lora)
    page.get_by_label("Name", exact=True).fill("imported-lora")
    page.get_by_role("button", name="Import", exact=True).click()
    page.locator("#import-status:has-text('Imported')").wait_for(timeout=60_000)
    page.locator("#adapters tr[data-name='imported-lora']").wait_for()
    listed = {a["name"]: a for a in alices.get("/adapters").json()["adapters"]}
    assert listed["imported-lora"]["mine"] and listed["imported-lora"]["visibility"] == "private"

    page.get_by_label("LoRA file").set_input_files(lora)  # the name is taken now: 409, under the name
    page.get_by_label("Name", exact=True).fill("imported-lora")
    page.get_by_role("button", name="Import", exact=True).click()
    page.locator("#imp-name-error").wait_for()
    assert "already exists" in page.locator("#imp-name-error").inner_text()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    page.get_by_label("LoRA file").set_input_files(bad)
    page.get_by_label("Name", exact=True).fill("bad-lora")
    page.get_by_role("button", name="Import", exact=True).click()
    page.locator("#imp-file-error").wait_for()
    assert alices.get("/adapters/bad-lora").status_code == 404

    delete = page.get_by_role("button", name="Delete imported-lora")
    delete.click()
    assert delete.inner_text() == "Really delete?"  # a second click deletes
    delete.click()
    page.locator("#adapters tr[data-name='imported-lora']").wait_for(state="detached")
    assert alices.get("/adapters/imported-lora").status_code == 404
