"""A standalone launch in a real browser (headless Chromium driven by Selenium): the login page, the
TOTP page, the patient picker and the consent page with one scope unticked and one narrowed to a category, then the code exchange
and reads and searches inside and outside the grant.

Chromium and its driver come from the Debian packages ``chromium`` and ``chromium-driver``
(``tools/ensure_chromium.sh`` installs them; CI runs it). Without them the test skips, except under
CI=true, where it fails.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from conformance_tests import smart
from conformance_tests.client import FhirClient
from conformance_tests.smart import SmartSetup

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

LAB_SCOPE = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        message = "headless Chromium is not installed (tools/ensure_chromium.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_standalone_launch_in_a_browser(smart_setup: SmartSetup, browser: webdriver.Chrome, tmp_path: Path) -> None:
    setup = smart_setup
    if setup.browser_client is None or setup.callback is None:
        pytest.skip("the browser test drives this project's login pages")
    client = setup.browser_client
    config = smart.discover(setup.fhir_base)
    scope = "launch/patient openid fhirUser patient/Patient.rs patient/Observation.rs patient/Encounter.rs"
    verifier, challenge = smart.pkce()
    params = smart.authorize_params(setup, client, scope, challenge)
    wait = WebDriverWait(browser, 20)
    browser.get(f"{config['authorization_endpoint']}?{urlencode(params)}")

    # Login: labelled inputs, a plain form.
    wait.until(expected_conditions.presence_of_element_located((By.ID, "username")))
    assert browser.find_element(By.CSS_SELECTOR, "label[for=username]").text
    assert browser.find_element(By.CSS_SELECTOR, "label[for=password]").text
    browser.find_element(By.ID, "username").send_keys(setup.mfa_user.username)
    browser.find_element(By.ID, "password").send_keys(setup.mfa_user.password)
    browser.find_element(By.ID, "sign-in").click()

    # The second factor.
    wait.until(expected_conditions.presence_of_element_located((By.ID, "code")))
    assert setup.mfa_user.totp_secret
    browser.find_element(By.ID, "code").send_keys(smart.totp_code(setup.mfa_user.totp_secret))
    browser.find_element(By.ID, "verify").click()

    # The patient picker: search by name, pick ours.
    wait.until(expected_conditions.presence_of_element_located((By.ID, "name")))
    browser.find_element(By.ID, "name").send_keys("Aardvark")
    browser.find_element(By.ID, "search").click()
    wait.until(lambda d: "name=Aardvark" in d.current_url  # the page with the search's results, fully loaded
               and d.execute_script("return document.readyState") == "complete")
    radio = wait.until(expected_conditions.element_to_be_clickable(
        (By.CSS_SELECTOR, f"input[name=patient][value='{setup.patient}']")))
    radio.click()
    browser.find_element(By.ID, "choose").click()

    # Consent: every requested scope is listed and ticked. Untick Encounter; narrow Observation to laboratory
    # results (open the choices under it, untick the whole scope, tick the category).
    wait.until(expected_conditions.presence_of_element_located((By.ID, "approve")))
    boxes = {b.get_attribute("value"): b for b in browser.find_elements(By.CSS_SELECTOR, "fieldset > ul > li > input[name=scope]")}
    assert set(boxes) == set(scope.split())
    assert all(b.is_selected() for b in boxes.values())
    boxes["patient/Encounter.rs"].click()
    assert not boxes["patient/Encounter.rs"].is_selected()
    boxes["patient/Observation.rs"].click()
    observation_item = boxes["patient/Observation.rs"].find_element(By.XPATH, "..")
    observation_item.find_element(By.TAG_NAME, "summary").click()
    lab = observation_item.find_element(By.CSS_SELECTOR, f"input[value='{LAB_SCOPE}']")
    assert not lab.is_selected()
    lab.click()
    browser.find_element(By.ID, "approve").click()

    # Back at the app with a code.
    wait.until(expected_conditions.presence_of_element_located((By.ID, "done")))
    deadline = time.monotonic() + 10
    while not setup.callback.received and time.monotonic() < deadline:
        time.sleep(0.05)
    redirect = setup.callback.received[-1]
    assert redirect["state"] == [params["state"]]
    browser.save_screenshot(str(tmp_path / "callback.png"))

    resp = smart.token_request(setup, client, {"grant_type": "authorization_code", "code": redirect["code"][0],
                                               "redirect_uri": client.redirect_uri, "code_verifier": verifier})
    assert resp.status_code == 200, resp.text
    token = resp.json()
    assert token["patient"] == setup.patient
    assert set(token["scope"].split()) == set(scope.split()) - {"patient/Encounter.rs", "patient/Observation.rs"} | {LAB_SCOPE}
    assert token["id_token"]

    fhir = FhirClient(setup.fhir_base).with_token(token["access_token"])
    # Inside the grant.
    assert fhir.get(f"Patient/{setup.patient}").status_code == 200
    observations = fhir.get("Observation", params={"patient": setup.patient})
    assert observations.status_code == 200
    categories = [c["code"] for e in observations.json()["entry"] for cat in e["resource"]["category"] for c in cat["coding"]]
    assert categories == ["laboratory"]  # the vital-signs Observation is outside the narrowed grant
    # Outside it: the unticked scope, another patient, a write.
    assert fhir.get(f"Encounter/{setup.encounter}").status_code == 403
    assert fhir.get("Encounter", params={"patient": setup.patient}).status_code == 403
    assert fhir.get(f"Patient/{setup.other_patient}").status_code in (403, 404)
    assert fhir.get("Observation", params={"patient": setup.other_patient}).json().get("entry", []) == []
    created = fhir.post("Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                        "subject": {"reference": f"Patient/{setup.patient}"}})
    assert created.status_code == 403
