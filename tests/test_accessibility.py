"""Accessibility of the console: text colours meet WCAG AA contrast, every form control has a
label, drawings have a text alternative, and the keyboard reaches everything from a visible
"Skip to content"."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from accounts.models import Team, User
from tests.conftest import BASE_DIR, browser_login
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import write_model

STYLESHEET = BASE_DIR / "static" / "berth.css"
WCAG_AA_TEXT = 4.5
# Foreground and background pairs the stylesheet puts text on (variables or literal colours).
TEXT_ON_BACKGROUND = [
    ("--text", "--bg"),
    ("--text", "--surface"),
    ("--muted", "--surface"),
    ("--muted", "--bg"),
    ("--accent", "--surface"),
    ("--accent", "--bg"),
    ("--accent-text", "--accent"),
    ("--ok", "--ok-bg"),
    ("--failed", "--failed-bg"),
    ("--denied", "--denied-bg"),
    ("#0a3069", "#ddf4ff"),  # queued/launching/loading badges
    ("#fff", "#1b2a3a"),  # the top bar
    ("--muted", "#f3f9ff"),  # hints on the start-up progress card
    ("#e6edf3", "#0d1117"),  # logs and the docker run line
]


def _variables(css: str) -> dict[str, str]:
    root = re.search(r":root\s*\{(.*?)\}", css, re.S).group(1)
    return dict(re.findall(r"(--[a-z-]+):\s*(#[0-9a-fA-F]{3,6})", root))


def _luminance(colour: str) -> float:
    digits = colour.lstrip("#")
    if len(digits) == 3:
        digits = "".join(ch * 2 for ch in digits)
    channels = [int(digits[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    light, dark = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_text_colours_meet_wcag_aa_contrast() -> None:
    variables = _variables(STYLESHEET.read_text(encoding="utf-8"))
    low = {}
    for foreground, background in TEXT_ON_BACKGROUND:
        fg, bg = variables.get(foreground, foreground), variables.get(background, background)
        if (ratio := contrast(fg, bg)) < WCAG_AA_TEXT:
            low[f"{foreground} on {background}"] = round(ratio, 2)
    assert low == {}


# Every visible control needs an accessible name; every drawing a text alternative or to be
# hidden from assistive technology.
UNLABELLED = """() => [...document.querySelectorAll('input,select,textarea,button,svg,progress')]
  .filter(el => el.type !== 'hidden' && el.getClientRects().length > 0)
  .filter(el => {
    if (el.closest('[aria-hidden="true"]')) return false;
    const named = el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
      || (el.labels && el.labels.length) || (el.tagName === 'BUTTON' && el.textContent.trim());
    return !named;
  })
  .map(el => el.outerHTML.slice(0, 120))"""
PAGES = ["/", "/models/", "/models/register/", "/gpus/", "/deployments/", "/deployments/new/"]


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_every_control_is_labelled_and_the_keyboard_reaches_the_content(
    page: Any, alice: User, team_a: Team, tmp_path: Path
) -> None:
    write_model(tmp_path / "team-a" / "tiny")
    registered_model(team_a, tmp_path, "tiny")
    host_with_gpus(count=2)
    browser_login(page, "alice")
    for path in PAGES:
        page.goto(path)
        page.wait_for_load_state("networkidle")
        assert page.evaluate(UNLABELLED) == [], path

    page.goto("/")
    page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    expect(skip).to_be_focused()
    expect(skip).to_be_in_viewport()
    page.keyboard.press("Enter")
    assert page.url.endswith("#main")
    page.keyboard.press("Tab")
    focused_outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focused_outline != "none"  # the focused element shows where the keyboard is
