"""The portal's pages on a desktop screen and on a phone, in Chromium over https.

On a 390-px-wide phone no page may be wider than the screen (no sideways scrolling): the query
form, the patient, study and series results, the downloader page and the patient's study page.
Each page is also saved as a screenshot at both sizes in the test output, for a person to look at.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page

from browser import DESKTOP, PHONE, chromium, screenshot, sign_in
from conftest import ADMIN_PASSWORD, SITE_NAME, TLSStack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = [pytest.mark.stack, pytest.mark.browser]

SIZES = {"desktop": DESKTOP, "phone": PHONE}


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


@pytest.fixture(scope="module")
def study(tls_stack: TLSStack) -> dict[str, str]:
    """A study with long values, as real ones have, and the patient's link to it."""
    dataset = fresh_study("CT_small.dcm", patient_name="Papadopoulou-Konstantinidou^Alexandra^Maria")
    dataset.PatientID = "PHONE-" + dataset.PatientID
    dataset.StudyDescription = "CT THORAX ABDOMEN PELVIS WITH CONTRAST (PORTAL VENOUS PHASE)"
    dataset.SeriesDescription = "AXIAL 1.25MM SOFT TISSUE KERNEL B30F RECONSTRUCTION"
    dataset.InstitutionName = "St. Test Hospital, Department of Diagnostic Imaging"
    assert c_store(tls_stack, dataset) == 0
    staff = tls_stack.sign_in()
    study_id = orthanc_id(tls_stack, dataset.StudyInstanceUID)
    link = staff.post(
        f"{tls_stack.url}/tokens/studies/{study_id}/link",
        headers={"X-CSRFToken": csrf_token(staff.get(f"{tls_stack.url}/").text)},
    ).json()["link"]
    return {"patient_id": dataset.PatientID, "study_id": study_id, "token": link.split("?", 1)[1]}


def width_of(page: Page) -> int:
    return page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")


def staff_pages(study: dict[str, str]) -> dict[str, str]:
    patient = study["patient_id"]
    return {
        "start": "/",
        "query": "/query",
        "patients": f"/query/patients?patient_id={patient}",
        "studies": f"/query/studies?patient_id={patient}",
        "series": f"/query/studies/{study['study_id']}/series",
        "downloader": f"/query/studies/{study['study_id']}/downloader",
    }


@pytest.mark.parametrize("size", SIZES)
def test_the_staff_pages_fit_the_screen(browser: Browser, tls_stack: TLSStack, study, size: str) -> None:
    page = browser.new_context(viewport=SIZES[size], is_mobile=size == "phone").new_page()
    sign_in(page, tls_stack, "admin", ADMIN_PASSWORD)
    too_wide = {}
    for name, address in staff_pages(study).items():
        page.goto(f"{tls_stack.browser_url}{address}")
        screenshot(page, name)
        if width_of(page) > SIZES[size]["width"]:
            too_wide[name] = width_of(page)
    assert not too_wide, f"pages wider than the {size}'s screen: {too_wide}"
    # The results still show what they show on a desktop: the patient's name, the study's description.
    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={study['patient_id']}")
    assert page.get_by_text("PORTAL VENOUS PHASE").is_visible()
    assert page.get_by_role("link", name="Viewer").first.is_visible()


@pytest.mark.parametrize("size", SIZES)
def test_the_patients_page_fits_the_screen(browser: Browser, tls_stack: TLSStack, study, size: str) -> None:
    page = browser.new_context(viewport=SIZES[size], is_mobile=size == "phone").new_page()
    for name, address in (("patient", "/token"), ("handout", "/token/handout")):
        page.goto(f"https://{SITE_NAME}:{tls_stack.web_port}{address}?{study['token']}")
        screenshot(page, name)
        assert width_of(page) <= SIZES[size]["width"], name
    page.goto(f"https://{SITE_NAME}:{tls_stack.web_port}/token?{study['token']}")
    assert page.get_by_role("link", name="View the study online").is_visible()
