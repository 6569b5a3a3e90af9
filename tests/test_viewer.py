"""The OHIF viewer in a real browser: a patient's link and a signed-in user both see the images."""

from __future__ import annotations

import pytest
import requests

from browser import chromium, wait_for_image
from conftest import ADMIN_PASSWORD, Stack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = [pytest.mark.stack, pytest.mark.browser]


def study_link(stack: Stack, sample: str) -> tuple[str, str]:
    dataset = fresh_study(sample)
    assert c_store(stack, dataset) == 0
    doctor = stack.sign_in()
    home = doctor.get(f"{stack.url}/")
    made = doctor.post(
        f"{stack.url}/tokens/studies/{orthanc_id(stack, dataset.StudyInstanceUID)}/link",
        headers={"X-CSRFToken": csrf_token(home.text)},
    ).json()
    return f"{stack.url}/token?{made['link'].split('?', 1)[1]}", dataset.StudyInstanceUID


@pytest.mark.parametrize("sample", ["CT_small.dcm", "MR_small.dcm"])
def test_a_patient_opens_the_link_and_sees_the_images(stack: Stack, sample: str) -> None:
    link, study_uid = study_link(stack, sample)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(link)
        assert "Your study at" in page.content()
        with page.expect_navigation(wait_until="commit"):
            page.get_by_role("link", name="View the study online").click()
        assert page.url.startswith(f"{stack.url}/viewer?StudyInstanceUIDs={study_uid}"), page.url
        wait_for_image(page)
        page.screenshot(path=str(stack.data / f"viewer-{sample}.png"))
        blocked = [message for message in errors if "Content Security Policy" in message]
        assert not blocked, blocked


def test_the_viewer_shows_nothing_without_a_grant(stack: Stack) -> None:
    _link, study_uid = study_link(stack, "CT_small.dcm")
    with chromium() as browser:
        page = browser.new_page()
        statuses: list[int] = []
        page.on(
            "response",
            lambda response: statuses.append(response.status) if "/dicom-web/" in response.url else None,
        )
        page.goto(f"{stack.url}/viewer?StudyInstanceUIDs={study_uid}")
        page.wait_for_timeout(5000)
        assert statuses and set(statuses) <= {401}
        with pytest.raises(AssertionError):
            wait_for_image(page, timeout=3)


def test_a_signed_in_user_opens_the_viewer(stack: Stack) -> None:
    dataset = fresh_study("MR_small.dcm")
    assert c_store(stack, dataset) == 0
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{stack.url}/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        page.click("button[type=submit]")
        page.goto(f"{stack.url}/viewer?StudyInstanceUIDs={dataset.StudyInstanceUID}")
        wait_for_image(page)
    assert requests.get(f"{stack.url}/healthz").status_code == 200
