"""Re-writer backed by any OpenAI-compatible chat server: vLLM, SGLang, Ollama, llama.cpp or a
hosted API. Standard library only (``urllib``); no ``openai`` package.

    vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000          # then:
    OpenAIRewriter(base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")

The API key is never stored: ``api_key_env`` is the NAME of an environment variable, read at
request time. It is absent from ``config()``, ``identity()``, ``repr()``, the cache and the
logs (error messages are scrubbed of it). A server that needs no key (a local vLLM) works with
the variable unset: no Authorization header is sent.

Images (visual recaptioning) are sent as base64 ``data:`` URLs in ``image_url`` content parts,
which vLLM, SGLang, Ollama and OpenAI accept for vision-language models.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sora_train.rewrite.base import RewriteError, Rewriter
from sora_train.utils.errors import SoraError
from sora_train.utils.kwargs import constructor_kwargs

# Worth retrying: request timeout, conflict, too early, rate limited, and server-side errors.
_RETRYABLE_HTTP = {408, 409, 425, 429}
_MAX_ERROR_BODY = 300


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_mime(data: bytes) -> str:
    """MIME type from magic bytes (JPEG when unknown: what video frames are usually encoded as)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


class OpenAIRewriter(Rewriter):
    """POSTs ``{base_url}/chat/completions``.

    Args:
        model: model name as the server knows it (vLLM: the served model name).
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``; must not embed credentials.
        api_key_env: name of the environment variable holding the key (read per request).
        max_tokens: completion budget; the base class caps the words anyway.
        image_detail: ``detail`` of image parts ("auto", "low", "high").
        **kwargs: the shared ``Rewriter`` options.
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 512,
        image_detail: str = "auto",
        **kwargs: Any,
    ):
        if not model or not isinstance(model, str):
            raise SoraError("OpenAIRewriter: model must be the model name the server serves (e.g. model=Qwen/Qwen2.5-7B-Instruct)")
        parsed = urllib.parse.urlsplit(str(base_url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SoraError(f"OpenAIRewriter: base_url={base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        if parsed.username or parsed.password or parsed.query:
            # Do not echo the URL: it holds the credential.
            raise SoraError(
                "OpenAIRewriter: base_url must not contain credentials or a query string; "
                "put the key in the environment variable named by api_key_env"
            )
        if not api_key_env or not str(api_key_env).replace("_", "").isalnum():
            raise SoraError(
                "OpenAIRewriter: api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), not a key"
            )
        if max_tokens < 1:
            raise SoraError(f"OpenAIRewriter: max_tokens={max_tokens} must be >= 1")
        if image_detail not in ("auto", "low", "high"):
            raise SoraError(f"OpenAIRewriter: image_detail={image_detail!r} is not one of auto, low, high")
        super().__init__(**kwargs)
        url = str(base_url).rstrip("/")
        if url.endswith("/chat/completions"):  # a pasted endpoint instead of the API root
            url = url[: -len("/chat/completions")]
        self.base_url = url
        self.model = model
        self.api_key_env = str(api_key_env)
        self.max_tokens = int(max_tokens)
        self.image_detail = image_detail
        # A local server is never reached through a corporate proxy set in the environment.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def model_id(self) -> str:
        return self.model

    def _identity_extra(self) -> dict[str, Any]:
        # base_url is left out on purpose: the same model behind another port or host gives the
        # same outputs, and URLs are machine-local.
        return {"max_tokens": self.max_tokens, "image_detail": self.image_detail}

    def _backend_config(self) -> dict[str, Any]:
        return constructor_kwargs(self, OpenAIRewriter)

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "")
        if len(key) >= 4:
            text = text.replace(key, "***")
        return text

    # -- request --------------------------------------------------------------------------------

    def _request_body(self, prompt: str, images: list[bytes] | None) -> dict[str, Any]:
        messages: list[dict[str, Any]] = self.messages(prompt, with_images=bool(images))
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": messages[-1]["content"]}]
            for im in images:
                url = f"data:{image_mime(im)};base64,{base64.b64encode(im).decode('ascii')}"
                parts.append({"type": "image_url", "image_url": {"url": url, "detail": self.image_detail}})
            messages[-1] = {"role": "user", "content": parts}
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "n": 1,
            "stream": False,
        }

    def _generate(self, prompt: str, images: list[bytes] | None) -> str:
        url = f"{self.base_url}/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)  # read per request; never kept on the object
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(self._request_body(prompt, images)).encode("utf-8")
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            # timeout bounds each blocking socket operation (connect, each read).
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001
                detail = ""
            hint = f" (is ${self.api_key_env} set?)" if e.code in (401, 403) else ""
            retryable = e.code in _RETRYABLE_HTTP or e.code >= 500
            raise RewriteError(f"HTTP {e.code} from {url}{hint}: {' '.join(detail.split())}", retryable=retryable) from None
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", None) or e
            raise RewriteError(f"request to {url} failed: {type(e).__name__}: {reason}") from None
        return self._parse(raw)

    @staticmethod
    def _parse(raw: bytes) -> str:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            snippet = " ".join(raw[:80].decode("utf-8", "replace").split())
            raise RewriteError(f"response is not JSON: {snippet!r}") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewriteError(f"response has no choices[0].message.content: {str(payload)[:120]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if content is None:
            return ""
        if not isinstance(content, str):
            raise RewriteError(f"choices[0].message.content is a {type(content).__name__}, not text")
        return content
