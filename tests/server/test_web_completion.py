"""The web page's completion mode at / in a real headless browser (Debian's chromium +
chromedriver) against a live server: type a prompt, press Generate, watch the continuation
stream in after it; and the mode the page opens in, which the served model suggests."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from conftest import tiny_settings  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402 (webpage skips this module without chromium)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from webpage import WAIT, browser, mode_of, open_page, set_field, text_of, wait_for_models  # noqa: F401

from cli_args import unescape  # noqa: E402
from server.app import load_engine  # noqa: E402


@pytest.fixture
def page(browser, live_server):
    return open_page(browser, live_server.url)  # no mode chosen: the page follows the model


def runs(driver) -> int:
    return int(driver.find_element(By.ID, "output").get_attribute("data-runs") or 0)


def finished_run(driver, run: int):
    """The continuation element of generation number `run`, once it is done."""

    def done(d):
        el = d.find_elements(By.ID, "continuation")
        return (
            el
            and el[0].get_attribute("data-run") == str(run)
            and el[0].get_attribute("data-done") == "true"
            and el[0]
        )

    return WebDriverWait(driver, WAIT).until(done)


def generate(driver, prompt: str):
    """Type `prompt` in place of the old one, press Generate, wait for the continuation; its element."""
    before = runs(driver)
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "generate").click()
    return finished_run(driver, before + 1)


def test_prompt_streams_a_continuation_equal_to_the_api_one_with_its_usage(
    page, paced_live_server, openai_client
):
    assert mode_of(page) == "completion"
    sampling = dict(temperature=0.9, top_p=0.8, seed=11, max_tokens=16, top_k=40)
    for field, value in sampling.items():
        set_field(page, field.replace("_", "-"), value)
    prompt = "<b>Once</b> upon & a"  # short: the tiny test model has a 128-byte context
    el = generate(page, prompt)

    top_k = sampling.pop("top_k")
    api = openai_client.completions.create(
        model=paced_live_server.model, prompt=prompt, extra_body={"top_k": top_k}, **sampling
    )
    assert el.get_attribute("data-error") is None
    assert int(el.get_attribute("data-chunks")) > 1  # it arrived as a stream, not in one piece
    assert text_of(page, el) == api.choices[0].text != ""
    assert el.get_attribute("data-finish-reason") == api.choices[0].finish_reason
    assert int(el.get_attribute("data-prompt-tokens")) == api.usage.prompt_tokens == len(prompt.encode())
    assert int(el.get_attribute("data-completion-tokens")) == api.usage.completion_tokens
    assert float(el.get_attribute("data-tokens-per-second")) >= 0
    # the prompt is shown as text, never parsed as HTML, and the continuation right after it
    output = page.find_element(By.ID, "output")
    assert text_of(page, output) == prompt + api.choices[0].text and not output.find_elements(
        By.TAG_NAME, "b"
    )
    assert page.execute_script("return getComputedStyle(arguments[0]).fontWeight", el) != page.execute_script(
        "return getComputedStyle(document.querySelector('#output .prompt-text')).fontWeight"
    )
    stats = page.find_element(By.ID, "completion-stats").text
    assert f"{api.usage.prompt_tokens} prompt tokens" in stats
    assert f"{api.usage.completion_tokens} completion tokens" in stats
    assert f"finish: {api.choices[0].finish_reason}" in stats and "tokens/s" in stats


def test_continue_and_stop_sequences(page, openai_client, live_server):
    sampling = dict(temperature=0.0, max_tokens=12)
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 12)
    first = text_of(page, generate(page, "The"))
    assert (
        first
        == openai_client.completions.create(model=live_server.model, prompt="The", **sampling).choices[0].text
    )
    before = runs(page)
    page.find_element(By.ID, "continue").click()  # the text so far becomes the prompt
    el = finished_run(page, before + 1)
    assert page.find_element(By.ID, "prompt").get_attribute("value") == "The" + first
    assert (
        text_of(page, el)
        == openai_client.completions.create(model=live_server.model, prompt="The" + first, **sampling)
        .choices[0]
        .text
    )

    # stop sequences: one a line, with \n, \t and \\ written as escapes
    set_field(page, "stop", "a\\nb\n\n\\t\\\\x")
    assert page.execute_script("return readParams().stop") == ["a\nb", "\t\\x"]
    k = next(
        i
        for i in range(1, len(first) - 2)
        if first[i : i + 2].isprintable() and not set(first[i : i + 2]) & {"\ufffd", "\\"}
    )
    stop = first[k : k + 2]
    set_field(page, "stop", stop)
    el = generate(page, "The")
    api = openai_client.completions.create(model=live_server.model, prompt="The", stop=[stop], **sampling)
    assert text_of(page, el) == api.choices[0].text == first[: first.index(stop)]
    assert el.get_attribute("data-finish-reason") == api.choices[0].finish_reason == "stop"


def with_a_newline(openai_client, model, prompt, **sampling):
    """(seed, text): the first seed whose sampled continuation has a newline after some text."""
    for seed in range(50):
        text = (
            openai_client.completions.create(model=model, prompt=prompt, seed=seed, **sampling)
            .choices[0]
            .text
        )
        if text.find("\n") > 0:
            return seed, text
    raise AssertionError("no sampled continuation had a newline")


def test_stop_field_reads_escapes_and_the_prompt_is_taken_literally(page, openai_client, live_server):
    """The project's rule, the CLIs' --stop alike (cli_args.unescape): stop strings read \\n, \\t,
    \\r and \\\\ as escapes and any other backslash as itself; prompts are literal."""
    typed = ["\\n", "\\t", "\\r", "\\\\", "\\\\n", "a\\x\\", "\\n\\t", "tab\\tend"]
    read = page.execute_script("return arguments[0].map(unescapeStop)", typed)
    assert read == ["\n", "\t", "\r", "\\", "\\n", "a\\x\\", "\n\t", "tab\tend"]
    assert read == [unescape(t) for t in typed]

    # a stop field of \n (backslash, n) ends a generation at its first newline
    sampling = dict(temperature=1.5, top_p=1.0, max_tokens=100)
    seed, text = with_a_newline(openai_client, live_server.model, "Once", **sampling)
    for field, value in dict(sampling, seed=seed, stop="\\n").items():
        set_field(page, field.replace("_", "-"), value)
    el = generate(page, "Once")
    assert text_of(page, el) == text[: text.index("\n")] and el.get_attribute("data-finish-reason") == "stop"

    # the prompt goes as typed: backslash-n stays two characters; Enter in the box is a newline
    set_field(page, "stop", "")
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 8)
    prompt = "x\\ny\nz"  # typed: x, backslash, n, y, Enter, z
    el = generate(page, prompt)
    assert page.find_element(By.ID, "prompt").get_attribute("value") == prompt
    assert el.get_attribute("data-prompt-tokens") == str(len(prompt)) == "6"  # one token a byte
    api = openai_client.completions.create(
        model=live_server.model, prompt=prompt, temperature=0, max_tokens=8
    )
    assert text_of(page, el) == api.choices[0].text


def test_page_opens_in_the_suggested_mode_until_the_user_chooses_one(
    page, tmp_path, tiny_checkpoint, server_factory
):
    hint = page.find_element(By.ID, "mode-hint")
    assert mode_of(page) == "completion" and hint.get_attribute("data-suggested-mode") == "completion"
    assert "continues text" in hint.text and "Completion mode" in hint.text
    assert (
        page.find_element(By.ID, "prompt").is_displayed()
        and not page.find_element(By.ID, "input").is_displayed()
    )
    page.find_element(By.ID, "tab-chat").click()
    assert mode_of(page) == "chat" and page.find_element(By.ID, "input").is_displayed()
    page.refresh()  # the user's choice outlives a reload, over the model's suggestion
    wait_for_models(page)
    assert mode_of(page) == "chat"
    assert page.find_element(By.ID, "tab-chat").get_attribute("aria-selected") == "true"

    path = tmp_path / "template.json"
    path.write_text(json.dumps({"roles": {"user": {"prefix": "Q: "}, "assistant": {"prefix": "A: "}}}))
    settings = tiny_settings(tiny_checkpoint, chat_template=str(path))
    server = server_factory(settings, engine=load_engine(settings))
    open_page(page, server.url)  # another origin, and its storage cleared: nothing chosen there
    hint = page.find_element(By.ID, "mode-hint")
    assert mode_of(page) == "chat" and hint.get_attribute("data-suggested-mode") == "chat"
    assert "Chat mode" in hint.text
    page.find_element(By.ID, "tab-completion").click()
    page.refresh()
    wait_for_models(page)
    assert mode_of(page) == "completion"
    assert page.find_element(By.ID, "mode-hint").get_attribute("data-suggested-mode") == "chat"


def test_stop_aborts_the_stream_and_the_server_frees_the_request(page, paced_live_server, openai_client):
    greedy = dict(temperature=0.0, max_tokens=60)
    full = openai_client.completions.create(model=paced_live_server.model, prompt="hi", **greedy).choices[0]
    assert full.finish_reason == "length"  # so the page's run cannot end by itself before 60 tokens
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 60)
    page.find_element(By.ID, "prompt").send_keys("hi")
    page.find_element(By.ID, "generate").click()
    WebDriverWait(page, WAIT).until(
        lambda d: int(d.find_element(By.ID, "continuation").get_attribute("data-chunks")) >= 1
    )
    page.find_element(By.ID, "generate-stop").click()
    el = finished_run(page, 1)
    assert el.get_attribute("data-finish-reason") == "stopped" and el.get_attribute("data-error") is None
    shown = text_of(page, el)
    assert shown and full.text.startswith(shown) and shown != full.text
    assert page.find_element(By.ID, "generate").is_enabled()
    assert not page.find_element(By.ID, "generate-stop").is_enabled()
    engine = paced_live_server.engine
    WebDriverWait(page, WAIT).until(lambda _: engine.stats().running == 0 and engine.stats().waiting == 0)


def test_server_errors_are_shown_from_the_error_object(page, openai_client, live_server, monkeypatch):
    set_field(page, "max-tokens", 10**7)  # far beyond the context: the server answers 400
    el = generate(page, "hello")
    with pytest.raises(Exception) as api_error:
        openai_client.completions.create(model=live_server.model, prompt="hello", max_tokens=10**7)
    message = api_error.value.body["message"]
    assert message in el.get_attribute("data-error") and text_of(page, el) == ""
    shown = page.find_element(By.ID, "error")
    assert shown.is_displayed() and message in shown.text

    # an error sent inside the stream, after some text: a forward that fails from the third on
    set_field(page, "max-tokens", 20)
    calls, step = itertools.count(), live_server.engine.model.step

    def failing_step(*args, **kwargs):
        if next(calls) >= 2:
            raise RuntimeError("simulated kernel failure")
        return step(*args, **kwargs)

    monkeypatch.setattr(live_server.engine.model, "step", failing_step)
    el = generate(page, "hello")
    with httpx.stream(
        "POST",
        live_server.url + "/v1/completions",
        json={"prompt": "hello", "max_tokens": 20, "stream": True},
    ) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    message = json.loads(events[-2].removeprefix("data: "))["error"]["message"]
    assert el.get_attribute("data-error") == message and message in shown.text
    assert el.get_attribute("data-finish-reason") == ""
    monkeypatch.undo()
    set_field(page, "max-tokens", 4)  # and the next generation clears the error
    el = generate(page, "hello")
    assert el.get_attribute("data-error") is None and not shown.is_displayed()
