"""The OHIF viewer dressed for the portal, in Chromium over https: no onboarding tour, the
institution's name in its header as a link back (to the results for a signed-in user, to the study's
page for a patient), the image filling a phone's screen, and a bare ``/viewer/`` that leads back to
the portal. Screenshots of the viewer at both sizes go into the test output."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from control.site import Site

from browser import DESKTOP, PHONE, chromium, screenshot, sign_in, wait_for_image
from conftest import ADMIN_PASSWORD, SITE_NAME, TLSStack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = [pytest.mark.stack, pytest.mark.browser]


def institution(stack: TLSStack) -> str:
    """The institution's name as the portal's settings hold it now (other tests may rename it)."""
    return Site(stack.data).load_settings().institution


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


@pytest.fixture(scope="module")
def study(tls_stack: TLSStack):
    dataset = fresh_study("CT_small.dcm", patient_name="Viewer^Vera")
    assert c_store(tls_stack, dataset) == 0
    return dataset


def tour_started(viewer: Page) -> bool:
    """Whether OHIF started its onboarding tour (it notes every tour it starts at once)."""
    shown = viewer.evaluate("localStorage.getItem('shownTours')") or "[]"
    return shown != "[]" or viewer.locator(".shepherd-element").count() > 0


def portal_link(viewer: Page):
    return viewer.locator("a.pacs-portal-link")


def test_a_physician_sees_the_institution_no_tour_and_goes_back_to_the_results(
    browser: Browser, tls_stack: TLSStack, study
) -> None:
    page = browser.new_context(viewport=DESKTOP).new_page()
    sign_in(page, tls_stack, "admin", ADMIN_PASSWORD)
    results = f"{tls_stack.browser_url}/query/studies?patient_id={study.PatientID}"
    page.goto(results)
    with page.context.expect_page() as opened:
        page.get_by_role("link", name="Viewer").first.click()
    viewer = opened.value
    wait_for_image(viewer)
    assert not tour_started(viewer), "the viewer started its onboarding tour"
    link = portal_link(viewer)
    assert link.inner_text().split("\n")[-2:] == [institution(tls_stack), "Back to the results"]
    assert viewer.get_by_role("link", name=f"Back to the results: {institution(tls_stack)}").count() == 1
    screenshot(viewer, "viewer", full_page=False)
    with viewer.expect_navigation():
        link.click()
    assert viewer.url == results
    assert viewer.locator("table.results").count() == 1


def test_on_a_phone_the_image_gets_the_screen(browser: Browser, tls_stack: TLSStack, study) -> None:
    page = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()
    sign_in(page, tls_stack, "admin", ADMIN_PASSWORD)
    page.goto(f"{tls_stack.browser_url}/viewer?StudyInstanceUIDs={study.StudyInstanceUID}")
    wait_for_image(page)
    assert not tour_started(page)
    viewport = page.locator(".viewport-element").first.bounding_box()
    assert viewport is not None
    # Side panels open, the image was a strip of some 50 px beside the series list.
    assert viewport["width"] >= 0.75 * PHONE["width"], viewport
    screenshot(page, "viewer", full_page=False)


def test_a_patient_goes_back_to_the_study_page(browser: Browser, tls_stack: TLSStack) -> None:
    dataset = fresh_study("MR_small.dcm", patient_name="Patient^Paula")
    assert c_store(tls_stack, dataset) == 0
    staff = tls_stack.sign_in()
    link = staff.post(
        f"{tls_stack.url}/tokens/studies/{orthanc_id(tls_stack, dataset.StudyInstanceUID)}/link",
        headers={"X-CSRFToken": csrf_token(staff.get(f"{tls_stack.url}/").text)},
    ).json()["link"]
    patient_page = f"https://{SITE_NAME}:{tls_stack.web_port}/token?{link.split('?', 1)[1]}"

    page = browser.new_context(viewport=DESKTOP).new_page()
    page.goto(patient_page)
    with page.expect_navigation():
        page.get_by_role("link", name="View the study online").click()
    wait_for_image(page)
    assert not tour_started(page)
    back = page.get_by_role("link", name=f"Back to your study: {institution(tls_stack)}")
    with page.expect_navigation():
        back.click()
    assert page.url == patient_page
    assert page.locator("h1").inner_text() == f"Your study at {institution(tls_stack)}"


@pytest.mark.parametrize(
    ("signed_in", "lands_on"), [(True, "/query"), (False, "/")], ids=["signed-in", "nobody"]
)
def test_a_bare_viewer_address_leads_back_to_the_portal(
    browser: Browser, tls_stack: TLSStack, signed_in: bool, lands_on: str
) -> None:
    page = browser.new_context(viewport=DESKTOP).new_page()
    if signed_in:
        sign_in(page, tls_stack, "admin", ADMIN_PASSWORD)
    for address in ("/viewer/", "/viewer", "/viewer?StudyInstanceUIDs="):
        page.goto(f"{tls_stack.browser_url}{address}")
        assert page.url == f"{tls_stack.browser_url}{lands_on}", address
        assert institution(tls_stack) in page.inner_text("header")
