"""Caption re-writer: shared behaviour, every backend for real (a local OpenAI-compatible HTTP
server on 127.0.0.1, a tiny random causal LM), secrets hygiene, cache, conf/rewriter."""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
import unicodedata
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sora_train.rewrite import (
    DEFAULT_EXAMPLES,
    HFRewriter,
    IdentityRewriter,
    OpenAIRewriter,
    RewriteError,
    Rewriter,
    TemplateRewriter,
    clean_output,
    normalise_prompt,
)
from sora_train.utils.errors import SoraError

CONF = Path(__file__).resolve().parents[2] / "conf" / "rewriter"
KEY_ENV = "SORA_TEST_REWRITER_KEY"
KEY = "sk-test-Zq9SECRETvalue-4711"
FAST = {"backoff_s": 0.01, "timeout_s": 2.0}  # keep retries quick

DENSE = (
    "A small red ball rolls steadily from right to left across a smooth grey floor, its glossy "
    "surface catching a bright highlight as it turns. The background is a plain studio wall, evenly "
    "lit, with a soft shadow trailing beneath the ball. The camera is locked off in a wide shot at "
    "table height. Clean, photorealistic rendering with soft diffuse light, crisp focus and neutral "
    "colour grading, the motion easy to follow from the first frame to the last one of the clip."
)


def words(text: str) -> int:
    return len(text.split())


# ----------------------------------------------------------------------------- a local chat server


class ChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1:<free port>.

    ``mode``: ok | slow | 500 | garbage | empty | 401 | echo_auth. ``script`` is a list of modes
    used (and consumed) before ``mode``. Every request is recorded.
    """

    def __init__(self):
        self.mode = "ok"
        self.script: list[str] = []
        self.delay = 2.0
        self.requests: list[dict] = []
        self.release = threading.Event()  # frees "slow" handlers at shutdown
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                    mode = outer.script.pop(0) if outer.script else outer.mode
                outer.handle(self, mode, json.loads(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler, mode: str, body: dict) -> None:
        if mode == "slow":
            self.release.wait(self.delay)
            mode = "ok"
        if mode == "500":
            return self._send(h, 500, b'{"error": "overloaded"}')
        if mode == "401":
            return self._send(h, 401, b'{"error": "bad key"}')
        if mode == "echo_auth":  # a careless server that echoes the credential back
            return self._send(h, 401, json.dumps({"error": f"invalid {h.headers.get('Authorization')}"}).encode())
        if mode == "garbage":
            return self._send(h, 200, b"<html>502 Bad Gateway</html>", "text/html")
        user = body["messages"][-1]["content"]
        prompt = user if isinstance(user, str) else user[0]["text"]
        content = "" if mode == "empty" else f'Sure! Here is the rewritten prompt:\n\n"[{prompt}] {DENSE}"'
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        self._send(h, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, data: bytes, ctype: str = "application/json") -> None:
        try:
            h.send_response(code)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def openai(server: ChatServer, **kw) -> OpenAIRewriter:
    return OpenAIRewriter(**{"model": "tiny-chat", "base_url": server.url, "api_key_env": KEY_ENV, **FAST, **kw})


def all_text_under(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- openai backend


def test_openai_rewrites_caches_and_never_leaks_the_key(server, key_env, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    rw = openai(server, cache_dir=str(cache), concurrency=3, temperature=0.2)
    prompts = [f"a red ball number {i}" for i in range(5)]
    results = rw.rewrite(prompts, progress=True)

    assert [r.status for r in results] == ["rewritten"] * 5
    for p, r in zip(prompts, results):  # order preserved; preamble and quotes stripped
        assert r.original == p and r.text.startswith(f"[{p}] A small red ball") and r.error is None
        assert words(r.text) <= 120 and not r.text.endswith('"')
    assert rw.stats["rewritten"] == 5 and rw.stats["fallback"] == 0

    assert len(server.requests) == 5
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "tiny-chat" and body["temperature"] == 0.2 and body["stream"] is False
    assert body["messages"][0]["role"] == "system" and "80 to 120 words" in body["messages"][0]["content"]
    assert [m["role"] for m in body["messages"][1:3]] == ["user", "assistant"]  # few-shot examples

    # A second run (fresh object, same config) is served from the cache: no new requests.
    again = openai(server, cache_dir=str(cache), concurrency=3, temperature=0.2)
    cached = again.rewrite(prompts)
    assert [r.status for r in cached] == ["cached"] * 5 and again.stats["cached"] == 5
    assert [r.text for r in cached] == [r.text for r in results]
    assert len(server.requests) == 5
    # Another temperature is another identity: a miss.
    assert openai(server, cache_dir=str(cache), temperature=0.3).rewrite_one(prompts[0]).status == "rewritten"

    # The key is nowhere but in the Authorization header.
    for where in (caplog.text, repr(rw), json.dumps(rw.identity()), json.dumps(rw.config()), all_text_under(cache)):
        assert KEY not in where
    assert rw.config()["api_key_env"] == KEY_ENV and "api_key" not in json.dumps(rw.identity())
    assert not any(KEY in str(v) for v in vars(rw).values())


def test_openai_key_scrubbed_from_errors_a_server_echoes(server, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    server.mode = "echo_auth"
    r = openai(server).rewrite_one("a cat")
    assert r.status == "fallback" and r.text == "a cat"
    assert "HTTP 401" in r.error and "***" in r.error and KEY not in r.error
    assert f"${KEY_ENV}" in r.error  # the hint names the variable, not the value
    assert len(server.requests) == 1  # 401 is not retried
    assert KEY not in caplog.text and "fell back" in caplog.text


def test_openai_no_key_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert openai(server).rewrite_one("a dog").status == "rewritten"
    assert "Authorization" not in server.requests[0]["headers"]


def test_openai_500s_then_success_is_retried(server, key_env):
    server.script = ["500", "500"]
    rw = openai(server, max_retries=3)
    r = rw.rewrite_one("a cat")
    assert r.status == "rewritten" and len(server.requests) == 3
    assert rw.stats["retries"] == 2 and rw.stats["rewritten"] == 1


def test_openai_persistent_500_falls_back_after_max_retries(server, key_env):
    server.mode = "500"
    rw = openai(server, max_retries=2)
    r = rw.rewrite_one("a cat")
    assert r.status == "fallback" and r.text == "a cat" and "HTTP 500" in r.error
    assert len(server.requests) == 3 and rw.stats["fallback"] == 1


def test_openai_timeout_retries_then_falls_back(server, key_env):
    server.mode = "slow"
    rw = openai(server, timeout_s=0.2, max_retries=1)
    t0 = time.monotonic()
    r = rw.rewrite_one("a slow cat")
    assert time.monotonic() - t0 < 1.5  # 2 attempts x 0.2 s, not the server's 2 s
    assert r.status == "fallback" and r.text == "a slow cat" and "timed out" in r.error
    assert len(server.requests) == 2


def test_openai_garbage_response_falls_back(server, key_env):
    server.mode = "garbage"
    rw = openai(server, max_retries=1)
    r = rw.rewrite_one("a cat")
    assert r.status == "fallback" and "not JSON" in r.error and len(server.requests) == 2


def test_openai_empty_content_falls_back(server, key_env):
    server.mode = "empty"
    greedy = openai(server, temperature=0.0, max_retries=3)
    r = greedy.rewrite_one("a cat")
    assert r.status == "fallback" and "empty" in r.error
    assert len(server.requests) == 1  # greedy would repeat itself: no retry
    sampled = openai(server, temperature=0.7, max_retries=2)
    assert sampled.rewrite_one("a cat").status == "fallback"
    assert len(server.requests) == 1 + 3


def test_openai_unreachable_server_falls_back(key_env):
    s = ChatServer()
    url = s.url
    s.close()  # nothing listens there any more
    rw = OpenAIRewriter(model="m", base_url=url, api_key_env=KEY_ENV, max_retries=1, **FAST)
    results = rw.rewrite(["a", "b"])
    assert [r.status for r in results] == ["fallback"] * 2 and [r.text for r in results] == ["a", "b"]


def test_openai_sends_images_as_data_urls(server, key_env, tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    jpg = b"\xff\xd8\xff\xe0" + bytes(range(40))
    rw = openai(server, cache_dir=str(tmp_path))
    results = rw.rewrite(["a cat", "a dog"], images=[[png, jpg], []])
    assert [r.status for r in results] == ["rewritten"] * 2
    by_prompt = {}
    for req in server.requests:
        content = req["body"]["messages"][-1]["content"]
        by_prompt["a cat" if isinstance(content, list) else "a dog"] = content
    parts = by_prompt["a cat"]
    assert parts[0]["type"] == "text" and "Frames from the video" in parts[0]["text"]
    urls = [p["image_url"]["url"] for p in parts[1:]]
    assert [p["type"] for p in parts[1:]] == ["image_url"] * 2
    assert urls[0] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert urls[1].startswith("data:image/jpeg;base64,") and base64.b64decode(urls[1].split(",")[1]) == jpg
    assert by_prompt["a dog"] == "a dog"  # no images: plain text content
    # The images are part of the cache key.
    assert rw.cache_key("a cat", [png]) != rw.cache_key("a cat") != rw.cache_key("a cat", [jpg])
    with pytest.raises(SoraError, match="image lists"):
        rw.rewrite(["a", "b"], images=[[png]])


def test_openai_rejects_bad_config():
    with pytest.raises(SoraError, match="credentials") as e:
        OpenAIRewriter(model="m", base_url="https://user:hunter2@api.example.com/v1")
    assert "hunter2" not in str(e.value)
    with pytest.raises(SoraError, match="credentials"):
        OpenAIRewriter(model="m", base_url="https://api.example.com/v1?api_key=hunter2")
    with pytest.raises(SoraError, match="api_key_env"):
        OpenAIRewriter(model="m", api_key_env="sk-abc-123")
    with pytest.raises(SoraError, match="model"):
        OpenAIRewriter(model="")
    with pytest.raises(SoraError, match="base_url"):
        OpenAIRewriter(model="m", base_url="127.0.0.1:8000")
    rw = OpenAIRewriter(model="m", base_url="http://localhost:9/v1/chat/completions/")
    assert rw.base_url == "http://localhost:9/v1"


# ----------------------------------------------------------------------------- shared behaviour


class Flaky(Rewriter):
    """A test backend: behaviour chosen per prompt."""

    backend = "flaky"

    def _generate(self, prompt, images):
        if prompt.startswith("raise"):
            raise ValueError("boom")
        if prompt.startswith("fatal"):
            raise RewriteError("nope", retryable=False)
        if prompt.startswith("blank"):
            return " \n\t\x00 \"\" "
        time.sleep(random.random() * 0.01)  # shuffle completion order across threads
        return f"Here is the caption: {prompt} " + DENSE


def test_batch_order_stats_and_never_raises():
    rw = Flaky(concurrency=4, max_retries=1, backoff_s=0.001)
    prompts = [f"p{i}" for i in range(12)] + ["raise me", "fatal", "blank", "", None]
    results = rw.rewrite(prompts)
    assert [r.original for r in results[:12]] == prompts[:12]
    assert all(r.status == "rewritten" and r.text.startswith(f"p{i} ") for i, r in enumerate(results[:12]))
    tail = results[12:]
    assert [r.status for r in tail] == ["fallback"] * 5
    assert [r.text for r in tail] == ["raise me", "fatal", "blank", "", ""]
    assert "boom" in tail[0].error and tail[1].error == "nope" and tail[3].error == "empty prompt"
    assert rw.stats["rewritten"] == 12 and rw.stats["fallback"] == 5
    # "raise" is retried once; "fatal" is not; "blank" is retried because temperature > 0.
    assert rw.stats["retries"] == 2
    rw.reset_stats()
    assert rw.stats["rewritten"] == 0


def test_rewrite_one_survives_a_broken_cache(tmp_path):
    rw = Flaky(cache_dir=str(tmp_path))
    first = rw.rewrite_one("a cat")
    key = rw.cache_key("a cat")
    path = rw.cache.path(key)
    assert path.is_file() and json.loads(path.read_text())["text"] == first.text
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    assert rw.rewrite_one("a cat").status == "cached"
    path.write_text("{not json")
    assert rw.rewrite_one("a cat").status == "rewritten"  # a corrupt entry is a miss
    assert len(rw.cache) == 1


def test_shared_option_validation():
    with pytest.raises(SoraError, match="min_words"):
        Flaky(min_words=100, max_words=50)
    with pytest.raises(SoraError, match="concurrency"):
        Flaky(concurrency=0)
    with pytest.raises(SoraError, match=r"examples\[0\]"):
        Flaky(examples=[{"prompt": "x"}])
    rw = Flaky(system_prompt="Write {min_words}-{max_words} words.", examples=[], min_words=10, max_words=20)
    assert rw.system_prompt == "Write 10-20 words." and len(rw.messages("x")) == 2


def test_clean_output():
    assert clean_output('Sure! Here is the rewritten prompt:\n\n"A cat\x07 sleeps\u200b."') == "A cat sleeps."
    assert clean_output("<think>plan the answer</think>  **Caption:** A dog runs.") == "A dog runs."
    assert clean_output("<think>never finished") == ""
    assert clean_output("  \n\t \"\" ''") == ""
    assert clean_output("Here's a detailed description: “A bird flies.”") == "A bird flies."
    sentences = " ".join(f"Sentence {i} has exactly six words." for i in range(40))  # 240 words
    capped = clean_output(sentences, max_words=100, min_words=80)
    assert words(capped) == 96 and capped.endswith("words.")  # backs off to the last full sentence
    run_on = " ".join(f"w{i}" for i in range(300))
    assert clean_output(run_on, max_words=50, min_words=40) == " ".join(f"w{i}" for i in range(50)) + "."
    assert clean_output(" ".join(["a cat"] * 60)) == ""  # decoding loop
    assert clean_output(" ".join(["a cat"] * 5), min_words=1) == "a cat a cat a cat a cat a cat"
    assert len(clean_output("x" * 5000, max_chars=100, max_words=10_000)) == 100
    text = clean_output("a\u0000b\u001bc\u202ed e\r\nf", max_words=100, min_words=1)
    assert all(unicodedata.category(ch)[0] != "C" for ch in text) and text == "abcd e f"


# ----------------------------------------------------------------------------- template and identity


def test_template_is_deterministic_and_within_word_range():
    prompts = ["a red ball rolls left", "A DOG RUNS ON THE BEACH", "  two cats ,playing  with yarn!!!", "sunset",
               "a blue cube slides to the right across a wooden table while the camera watches"]
    rw, other = TemplateRewriter(), TemplateRewriter()
    results = rw.rewrite(prompts)
    assert [r.text for r in results] == [r.text for r in other.rewrite(prompts)]
    for p, r in zip(prompts, results):
        assert r.status == "rewritten" and 80 <= words(r.text) <= 120, (p, words(r.text))
        assert r.text.startswith(normalise_prompt(p))
    assert results[1].text.startswith("A dog runs on the beach.")
    assert results[2].text.startswith("Two cats, playing with yarn!")
    assert len({r.text.split(". ", 1)[1] for r in results}) > 1  # choices depend on the prompt
    assert rw.identity()["model"] == "template-v1"


def test_template_long_short_and_empty_prompts():
    rw = TemplateRewriter(min_words=30, max_words=50)
    assert 30 <= words(rw.rewrite_one("a cat").text) <= 50
    long = rw.rewrite_one(" ".join(f"word{i}" for i in range(200)))
    assert long.status == "rewritten" and words(long.text) <= 50
    assert [rw.rewrite_one(p).status for p in ("", "   ", "...")] == ["fallback"] * 3
    assert rw.stats["retries"] == 0  # deterministic: failures are not retried


def test_identity_passthrough():
    rw = IdentityRewriter()
    prompts = ["  A cat  ", "", "x\ny"]
    results = rw.rewrite(prompts)
    assert [r.text for r in results] == prompts and {r.status for r in results} == {"identity"}
    assert rw.stats["identity"] == 3 and rw.identity()["backend"] == "identity"


# ----------------------------------------------------------------------------- hf backend


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random GPT-2 and a locally built word-level tokenizer (no download)."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    text = (DENSE + " " + " ".join(ex["caption"] for ex in DEFAULT_EXAMPLES)).lower()
    vocab = {"<pad>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for w in sorted(set(pre_tokenizers.Whitespace().pre_tokenize_str(text + " : prompt description system user assistant"))):
        vocab.setdefault(w[0], len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def _assert_valid(r, prompt: str, max_words: int):
    assert r.original == prompt and r.status in ("rewritten", "fallback")
    if r.status == "rewritten":  # random weights: whatever came out must have passed validation
        assert r.text and r.text == clean_output(r.text, max_words=max_words, min_words=1)
        assert words(r.text) <= max_words and all(unicodedata.category(c)[0] != "C" for c in r.text)
    else:
        assert r.text == prompt and r.error


def test_hf_plain_prompt_end_to_end(tiny_lm):
    rw = HFRewriter(str(tiny_lm), max_new_tokens=12, temperature=0.0, examples=[], max_words=10, min_words=5)
    results = rw.rewrite(["a red ball rolls left", "a dog on a beach"])
    for p, r in zip(["a red ball rolls left", "a dog on a beach"], results):
        _assert_valid(r, p, 10)
    assert rw.stats["rewritten"] + rw.stats["fallback"] == 2
    again = rw.rewrite_one("a red ball rolls left")
    assert again.text == results[0].text  # greedy: deterministic
    ident = rw.identity()
    assert ident["backend"] == "hf" and ident["model"] == tiny_lm.name and len(ident["config_sha256"]) == 64


def test_hf_chat_template_and_sampling(tiny_lm, tmp_path):
    import shutil

    folder = tmp_path / "chat_lm"
    shutil.copytree(tiny_lm, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # A template that, like Gemma's, rejects a system role: the backend folds it into the user turn.
    cfg["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    cfg_path.write_text(json.dumps(cfg))
    rw = HFRewriter(str(folder), max_new_tokens=8, temperature=0.9, examples=[], max_words=10, min_words=5)
    assert rw.tokenizer.chat_template
    r = rw.rewrite_one("a dog on a beach")
    _assert_valid(r, "a dog on a beach", 10)
    assert rw._fold_system
    assert "assistant:" in rw._chat_prompt("x") and "user: You write captions" in rw._chat_prompt("x")


def test_hf_overlong_prompt_falls_back_without_retry(tiny_lm):
    rw = HFRewriter(str(tiny_lm), max_new_tokens=500, temperature=0.0)  # default examples: ~400 tokens
    r = rw.rewrite_one("a cat")
    assert r.status == "fallback" and "positions" in r.error and rw.stats["retries"] == 0


def test_hf_bad_paths(tmp_path):
    with pytest.raises(SoraError, match="not a folder"):
        HFRewriter(str(tmp_path / "missing"))
    with pytest.raises(SoraError, match="config.json"):
        HFRewriter(str(tmp_path))


# ----------------------------------------------------------------------------- conf/rewriter


def _conf(name: str):
    """conf/rewriter/<name>.yaml as Hydra composes it (the option includes _base_/rewriter.yaml)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(overrides=[f"+rewriter={name}"]).rewriter


def _instantiate(name: str, **overrides):
    from hydra.utils import instantiate

    return instantiate(OmegaConf.merge(_conf(name), overrides))


def test_conf_rewriters_instantiate(server, tiny_lm, key_env):
    assert isinstance(_instantiate("identity"), IdentityRewriter)
    template = _instantiate("template")
    assert isinstance(template, TemplateRewriter) and template.rewrite_one("a cat").status == "rewritten"

    cfg = _conf("openai")
    assert cfg.api_key_env == "OPENAI_API_KEY" and cfg.base_url == "http://127.0.0.1:8000/v1"
    assert OmegaConf.is_missing(cfg, "model")
    with pytest.raises(Exception, match="model"):
        _instantiate("openai")
    rw = _instantiate("openai", model="tiny-chat", base_url=server.url, api_key_env=key_env, backoff_s=0.01)
    assert isinstance(rw, OpenAIRewriter) and rw.concurrency == 8
    assert rw.rewrite_one("a cat").status == "rewritten"

    hf = _instantiate("hf", path=str(tiny_lm), device="cpu", dtype="float32", examples=[])
    assert isinstance(hf, HFRewriter) and hf.concurrency == 1 and hf.dtype == "float32"

    # Every option carries the same shared options (written once, in _base_/rewriter.yaml).
    shared = set(_conf("identity").keys()) - {"_target_"}
    assert shared == set(OmegaConf.load(CONF / "_base_" / "rewriter.yaml").keys())
    for name in ("template", "openai", "hf"):
        assert shared <= set(_conf(name).keys()), name
    assert {p.stem for p in CONF.glob("*.yaml")} == {"identity", "template", "openai", "hf"}
