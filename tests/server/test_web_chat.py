"""The web page's chat mode at / in a real headless browser (Debian's chromium + chromedriver)
against a live server: type a message, press Enter, watch the reply stream in."""

from __future__ import annotations

import pytest
from conftest import TINY_CONTEXT  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402 (webpage skips this module without chromium)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# browser: a fixture, named as a parameter
from webpage import WAIT, browser, open_page, set_field, text_of, wait_for_models  # noqa: F401


@pytest.fixture
def page(browser, live_server):
    return open_page(browser, live_server.url, mode="chat")  # the user chose chat mode before


@pytest.fixture(scope="module")
def model(live_server):
    return live_server.model


def send(driver, text: str):
    """Type `text`, press Enter, wait for the reply to finish; the reply element."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)

    def finished(d):
        replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        return len(replies) > before and replies[-1].get_attribute("data-done") == "true" and replies[-1]

    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(finished)


def api_reply(openai_client, model, messages, **sampling) -> str:
    r = openai_client.chat.completions.create(model=model, messages=messages, **sampling)
    return r.choices[0].message.content


def test_typed_message_streams_a_reply_equal_to_the_api_reply(page, paced_live_server, openai_client, model):
    sampling = dict(temperature=0.9, top_p=0.8, seed=11, max_tokens=16)
    set_field(page, "temperature", sampling["temperature"])
    set_field(page, "top-p", sampling["top_p"])
    set_field(page, "seed", sampling["seed"])
    set_field(page, "max-tokens", sampling["max_tokens"])
    message = "<b>hi</b> & co"  # short: the tiny test model has a 64-byte context
    reply = send(page, message)

    assert reply.get_attribute("data-error") is None
    assert int(reply.get_attribute("data-chunks")) > 1  # it arrived as a stream, not in one piece
    text = text_of(page, reply)
    assert text and text == api_reply(
        openai_client, model, [{"role": "user", "content": message}], **sampling
    )
    assert reply.get_attribute("data-finish-reason") in ("stop", "length")
    # user text is shown as text, never parsed as HTML
    user = page.find_elements(By.CSS_SELECTOR, ".msg.user")[-1]
    assert text_of(page, user) == message and not user.find_elements(By.TAG_NAME, "b")
    assert "prompt" in page.find_element(By.ID, "status").text  # usage from the final chunk


def test_second_turn_carries_the_conversation_and_new_chat_forgets_it(page, openai_client, model):
    sampling = dict(temperature=0.0, max_tokens=8)
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", sampling["max_tokens"])
    first = text_of(page, send(page, "hi"))
    second = text_of(page, send(page, "ok"))
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "ok"},
    ]
    assert first == api_reply(openai_client, model, history[:1], **sampling)
    assert second == api_reply(openai_client, model, history, **sampling)

    page.find_element(By.ID, "reset").click()
    assert page.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert text_of(page, send(page, "ok")) == api_reply(
        openai_client, model, [{"role": "user", "content": "ok"}], **sampling
    )


def test_server_error_is_shown_from_the_error_object(page, openai_client, model):
    set_field(page, "top-p", 1.5)  # out of range: the server answers 400
    reply = send(page, "hello")
    error = reply.get_attribute("data-error")
    with pytest.raises(Exception) as api_error:
        openai_client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], top_p=1.5
        )
    assert error and api_error.value.body["message"] in error
    shown = page.find_element(By.ID, "error")
    assert shown.is_displayed() and api_error.value.body["message"] in shown.text
    # the failed message is handed back for editing, and was not kept as conversation
    box = page.find_element(By.ID, "input")
    assert box.get_attribute("value") == "hello"
    box.clear()
    set_field(page, "top-p", 0.95)
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 8)
    reply = send(page, "hi")
    assert reply.get_attribute("data-error") is None and not shown.is_displayed()
    assert text_of(page, reply) == api_reply(
        openai_client, model, [{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=8
    )


def kept_conversation(driver) -> list[dict]:
    """The conversation the page still sends, oldest first: the bubbles not dimmed as dropped."""
    return [
        {
            "role": "user" if "user" in el.get_attribute("class").split() else "assistant",
            "content": text_of(driver, el),
        }
        for el in driver.find_elements(By.CSS_SELECTOR, "#messages .msg:not(.dropped):not(.failed)")
    ]


def test_twenty_turns_keep_the_newest_within_the_context_and_say_so_once(page, openai_client, model):
    """The tiny model's context is TINY_CONTEXT tokens: a reply of the server's default max_tokens
    fills it, and twenty turns of 8 tokens do not fit; the page drops the oldest turns."""
    system = {"role": "system", "content": "Be brief."}
    set_field(page, "temperature", 0)
    set_field(page, "system", system["content"])
    replies = []
    for turn in range(20):
        # two turns with the server's default, two asking far beyond the context, then 8 tokens
        set_field(page, "max-tokens", "" if turn < 2 else 10**6 if turn < 4 else 8)
        reply = send(page, f"turn {turn}")
        assert reply.get_attribute("data-error") is None, reply.get_attribute("data-error")  # never a 400
        assert reply.get_attribute("data-finish-reason") in ("stop", "length")
        replies.append(reply)
    assert not page.find_element(By.ID, "error").is_displayed()
    for capped in replies[2:4]:  # max_tokens cut to the room left
        assert 0 < int(capped.get_attribute("data-max-tokens")) < TINY_CONTEXT
    assert replies[0].get_attribute("data-max-tokens") is None  # the server's default, which shrinks itself

    notes = page.find_elements(By.CSS_SELECTOR, "#messages .dropped-note")
    assert [text_of(page, n) for n in notes] == [
        f"older turns dropped to fit the model's {TINY_CONTEXT}-token context"
    ]
    dropped = page.find_elements(By.CSS_SELECTOR, "#messages .msg.dropped")
    assert text_of(page, dropped[0]) == "turn 0"
    # the last request: the system message and the newest turns, the ones not dimmed
    kept = kept_conversation(page)
    sent = [system] + kept[:-1]
    assert kept[-2] == {"role": "user", "content": "turn 19"} and len(kept) > 4  # more than one turn fits
    assert int(replies[-1].get_attribute("data-sent-messages")) == len(sent)
    assert kept[-1]["content"] == api_reply(openai_client, model, sent, temperature=0, max_tokens=8)
    # a reply cut short says so
    assert replies[-1].get_attribute("data-finish-reason") == "length"
    note = page.execute_script("return arguments[0].nextElementSibling", replies[-1])
    assert "cut-note" in note.get_attribute("class") and "reply cut short at 8 tokens" in text_of(page, note)


def test_a_message_too_long_for_the_context_is_refused_clearly_and_the_chat_goes_on(
    page, openai_client, model
):
    set_field(page, "temperature", 0)
    set_field(page, "max-tokens", 8)
    too_long = "x" * (TINY_CONTEXT + 10)  # one token a byte
    page.execute_script("document.getElementById('input').value = arguments[0]", too_long)
    reply = send(page, "")
    error = reply.get_attribute("data-error")
    assert (
        error and f"does not fit the model's {TINY_CONTEXT}-token context" in error and "Shorten it" in error
    )
    shown = page.find_element(By.ID, "error")
    assert shown.is_displayed() and shown.text == error
    box = page.find_element(By.ID, "input")
    assert box.get_attribute("value") == too_long  # handed back to edit
    box.clear()
    reply = send(page, "hi")
    assert reply.get_attribute("data-error") is None and not shown.is_displayed()
    assert reply.get_attribute("data-sent-messages") == "1"  # the refused message was not kept
    assert text_of(page, reply) == api_reply(
        openai_client, model, [{"role": "user", "content": "hi"}], temperature=0.0, max_tokens=8
    )


def test_settings_persist_across_reloads(page):
    set_field(page, "temperature", 0.3)
    set_field(page, "system", "Be brief.")
    page.refresh()
    assert page.find_element(By.ID, "temperature").get_attribute("value") == "0.3"
    assert page.find_element(By.ID, "system").get_attribute("value") == "Be brief."


def test_stop_button_aborts_the_stream_and_the_server_frees_the_request(page, live_server):
    set_field(page, "max-tokens", 40)
    page.find_element(By.ID, "input").send_keys("hi")
    # Click Send then Stop in one script, so the abort lands while the reply is still streaming.
    page.execute_script(
        "document.getElementById('send').click(); document.getElementById('chat-stop').click();"
    )
    reply = WebDriverWait(page, WAIT).until(
        lambda d: (
            (r := d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
            and r[-1].get_attribute("data-done") == "true"
            and r[-1]
        )
    )
    assert reply.get_attribute("data-finish-reason") == "stopped"
    assert reply.get_attribute("data-error") is None
    assert page.find_element(By.ID, "send").is_enabled()
    assert not page.find_element(By.ID, "chat-stop").is_enabled()
    assert page.find_element(By.ID, "stop").is_enabled()  # the stop-sequences field, a different thing
    engine = live_server.engine
    WebDriverWait(page, WAIT).until(lambda _: engine.stats().running == 0 and engine.stats().waiting == 0)


def test_api_key_typed_into_settings_unlocks_a_keyed_server(browser, tiny_checkpoint, server_factory):
    from server.app import load_engine
    from server.config import Settings

    settings = Settings(model=tiny_checkpoint, api_key="sekret", max_batch_size=2)
    server = server_factory(settings, engine=load_engine(settings))
    open_page(browser, server.url, mode="chat", wait=False)  # the model list needs the key
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT).until(lambda _: error.is_displayed())
    assert "(HTTP 401)" in error.text  # the page itself loads without a key; the API does not

    set_field(browser, "api-key", "sekret")  # its change handler lists the models again
    wait_for_models(browser)
    assert not error.is_displayed()
    set_field(browser, "max-tokens", 8)
    reply = send(browser, "hi")
    assert reply.get_attribute("data-error") is None and int(reply.get_attribute("data-chunks")) >= 1
    browser.refresh()  # the key was kept
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == "sekret"
