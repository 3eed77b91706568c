"""gpt-train on conversations (--data chats.jsonl): the template's rendering, the assistant-only
loss mask, bad lines, a tiny run whose best checkpoint generates with gpt-serve's template."""

import json
import time

import pytest
import torch
from train_helpers import TINY, read_metrics

import gpt
from gpt.evaluate import IGNORE
from server.chat_template import ChatTemplate
from training import chats
from training.cli import main
from training.config import TrainConfig
from training.loss import count_tokens
from training.trainer import train

CHAT = dict(TINY, tokenizer="byte", block_size=64, max_iters=3, eval_interval=3, sample_tokens=0)


def conversation(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say {i % 7}."},
            {"role": "assistant", "content": f"{i % 7}."},
        ]
    }


def write_chats(path, n=40, bad=()):
    lines = [json.dumps(conversation(i)) for i in range(n)]
    for n_line, text in bad:
        lines[n_line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_mask_is_exactly_the_assistant_tokens():
    tok = gpt.get_tokenizer("byte")
    template = ChatTemplate()
    msgs = [("user", "Hi", True), ("assistant", "Yo", True), ("user", "Ok?", True), ("assistant", "Ok", True)]
    x, y = chats.encode(template, tok, msgs)
    text = template.render([(r, c) for r, c, _ in msgs], add_generation_prompt=False)
    assert text == "User: Hi\nAssistant: Yo\nUser: Ok?\nAssistant: Ok\n"
    assert tok.decode(x) == text[:-1]
    # what the model writes after gpt-serve's prompt "...Assistant:": " Yo\n", " Ok\n"
    first = text.index("Assistant:") + len("Assistant:")
    second = text.rindex("Assistant:") + len("Assistant:")
    want = set(range(first, first + 4)) | set(range(second, second + 4))
    for i, target in enumerate(y):  # y[i] is the target for text[i + 1] (one byte a character)
        if i + 1 in want:
            assert target == ord(text[i + 1]), (i, text[i + 1])
        else:
            assert target == IGNORE, (i, text[i + 1])


def test_mask_custom_template_and_weight_zero():
    tok = gpt.get_tokenizer("byte")
    template = ChatTemplate.from_dict(
        {
            "roles": {
                "user": {"prefix": "<u>", "suffix": "</u>"},
                "assistant": {"prefix": "<a>", "suffix": "</a>"},
            },
            "generation_prompt": "<a>",
        }
    )
    msgs = [("user", "q", True), ("assistant", "no", False), ("user", "r", True), ("assistant", "yes", True)]
    x, y = chats.encode(template, tok, msgs)
    text = tok.decode([*x, y[-1]])  # the last token is the assistant's: its target is itself
    assert text == "<u>q</u><a>no</a><u>r</u><a>yes</a>"
    trained = "".join(text[i + 1] for i, t in enumerate(y) if t != IGNORE)
    assert trained == "yes</a>"


def test_sampler_pads_with_ignored_targets_and_resumes_exactly():
    rows = [([1, 2, 3], [IGNORE, 3, 4]), ([5] * 20, [6] * 20)]
    a = chats.ChatSampler(rows, 64, 3, seed=0, pad=0)
    x, y, lengths = a.next_batch()
    assert x.shape == y.shape and x.shape[1] in (16, 32)
    assert sorted(set(lengths.tolist())) <= [3, 20]  # its tokens/s counts these, not the padding
    assert count_tokens((x, y, lengths), "gpt") == int(lengths.sum()) < x.numel()
    for row_x, row_y in zip(x, y):
        n = 3 if row_x[0] == 1 else 20
        assert (row_y[n:] == IGNORE).all() and (row_x[n:] == 0).all()
    state = a.state_dict()
    b = chats.ChatSampler(rows, 64, 3, seed=99, pad=0)
    b.load_state_dict(state)
    for _ in range(3):
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))


def test_detection(tmp_path):
    chat = write_chats(tmp_path / "c.jsonl", 3)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"source": "a", "target": "b"}\n')
    assert chats.looks_like_chats(chat) and not chats.looks_like_chats(pairs)
    text = tmp_path / "t.txt"
    text.write_text(chat.read_text())
    assert not chats.looks_like_chats(text)


def test_bad_lines_are_reported_by_number(tmp_path, capsys):
    bad = [(3, "not json"), (7, json.dumps({"messages": [{"role": "user", "content": "x"}]}))]
    data = write_chats(tmp_path / "c.jsonl", 40, bad)
    s = train(dict(CHAT, data=[str(data)], out=str(tmp_path / "run"), max_iters=1, eval_interval=1))
    assert s["evals"]
    err = capsys.readouterr().err
    assert "2 of 40 lines are bad" in err and "line 3: not JSON" in err and "line 7: no assistant turn" in err


def test_too_many_bad_lines_exit_2(tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]}
    unknown = {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}
    bad = [(2, json.dumps(long)), (4, json.dumps(unknown)), (6, "{}"), (8, "[1]")]
    data = write_chats(tmp_path / "c.jsonl", 20, bad)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--preset",
                "gpt-tiny",
                "--tokenizer",
                "byte",
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "4 of 20 lines are bad" in err and "line 2: " in err and "longer than the block" in err
    assert "line 4: the chat template has no role 'wizard'" in err
    assert not (tmp_path / "run").exists()


def test_chat_run_trains_and_its_best_checkpoint_chats(tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    val = write_chats(tmp_path / "val.jsonl", 4)
    out = tmp_path / "run"
    s = train(dict(CHAT, data=[str(data)], val_data=[str(val)], out=str(out), sample_tokens=12))
    assert s["evals"] and all(torch.isfinite(torch.tensor(e["val_loss"])) for e in s["evals"])
    # its samples continue the first validation conversation as gpt-serve would prompt it, and
    # stop where its replies stop
    (shown,) = [r for r in read_metrics(out) if r["kind"] == "sample"][-1]["samples"]
    want = ChatTemplate().render([(m["role"], m["content"]) for m in conversation(0)["messages"][:-1]])
    assert shown["prompt"] == want and "\nUser:" not in shown["text"] and "\nSystem:" not in shown["text"]
    model, tok = gpt.load(out / "best")
    prompt = ChatTemplate().render([("user", "Say 3.")])
    piece = gpt.complete(model, tok, [prompt], gpt.SamplingParams(max_new_tokens=4, temperature=0.0))[0]
    # gpt-serve answers through /v1/chat/completions with the same template, and the same text
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    with TestClient(create_app(Settings(model=str(out), compile=False))) as client:
        for _ in range(300):  # the app loads its model in the background
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        r = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say 3."}], "max_tokens": 4, "temperature": 0},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["model"] == "run" and body["choices"][0]["message"]["content"] == piece.text.split("\nUser:")[0]
    )


def test_format_flag_and_custom_template_note(tmp_path):
    data = write_chats(tmp_path / "c.jsonl", 10)
    cfg = TrainConfig(data=[str(data)], format="text")
    assert not chats.is_chat_run(cfg) and chats.is_chat_run(cfg.replace(format="auto"))
    tpl = tmp_path / "t.json"
    tpl.write_text(
        json.dumps({"roles": {"system": {}, "user": {"prefix": "Q: "}, "assistant": {"prefix": "A: "}}})
    )
    cfg = cfg.replace(format="chat", chat_template=str(tpl))
    train_s, make_val, what, (prompt, stops) = chats.build_chat_data(cfg, gpt.get_tokenizer("byte"), 64, 0)
    assert f"gpt-serve --chat-template {tpl}" in what
    assert prompt.startswith("Be brief.Q: Say 2.") and stops == []  # this template has no stop strings
    assert len(train_s.examples) == 9 and len(make_val(0).examples) == 1


def test_resume_continues_the_same_batches(tmp_path):
    data = str(write_chats(tmp_path / "c.jsonl"))
    settings = dict(CHAT, data=[data], max_iters=4, eval_interval=2, warmup=2)  # warmup: lr ignores max_iters

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}

    train(dict(settings, out=str(tmp_path / "full")))
    train(dict(settings, out=str(tmp_path / "part"), max_iters=2))
    train({"out": str(tmp_path / "part"), "max_iters": 4}, resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_the_date_conversations_of_the_docs_example_are_all_good_chat_lines(tmp_path):
    from training import dates

    out = tmp_path / "dates-chat.jsonl"
    assert dates.main(["--chats", "50", "--out", str(out)]) == 0
    got = chats.read_chats(out, ChatTemplate(), gpt.get_tokenizer("byte"), 128)
    assert not got.bad and len(got.examples) == 50
    assert dates.main(["--chats", "0", "--out", str(out)]) == 2
