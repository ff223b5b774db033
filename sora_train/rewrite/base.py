"""The caption re-writer: short prompt -> dense 80-120 word description, one interface, many backends.

Sora-style models learn language from dense, descriptive captions; at sampling time a short
user prompt is expanded into the same style. The same re-writer serves both jobs: recaptioning
training data (``sora-data recaption``, optionally looking at frames) and prompt expansion
in ``sora-sample``.

Everything shared lives here; a backend implements only ``_generate(prompt, images) -> str``
(and says what defines its output in ``_identity_extra``). The base class adds:

- the default system prompt with few-shot examples and a target length in words;
- retries with exponential backoff (``max_retries`` retries after the first attempt);
- a thread pool for batches (``concurrency``), order preserved, optional rich progress bar;
- an on-disk cache keyed by sha256 of (prompt, images, backend identity);
- output validation (``clean_output``): control characters, whitespace, quotes, "Here is..."
  preambles, ``<think>`` blocks, length caps;
- fallback to the original text on ANY failure, counted in ``stats`` and logged. A data job
  over a million captions must not die because the server hiccuped once.

Timeouts are enforced by each backend (``timeout_s`` per HTTP socket operation for
``openai``, ``max_time`` of ``generate`` for ``hf``), since a Python thread cannot be killed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from sora_train.utils.errors import SoraError
from sora_train.utils.kwargs import constructor_kwargs
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

STATUSES = ("rewritten", "cached", "fallback", "identity")
_MAX_WARNINGS = 10  # fallbacks logged at WARNING before going quiet (a dead server would flood the log)
_MAX_BACKOFF_S = 60.0

DEFAULT_SYSTEM_PROMPT = (
    "You write captions for a text-to-video model. Rewrite the user's short prompt into one "
    "dense, vivid description of the video in plain prose, {min_words} to {max_words} words long. "
    "Cover, in this order: the main subject (appearance, colours, materials), the action and how "
    "it moves, the scene (place, time of day, lighting, weather, background), the camera (shot "
    "size, angle, movement, lens) and the visual style (photorealistic, animated, film look, "
    "colour grading). Keep every detail of the prompt and never contradict it; add only plausible "
    "details. No lists, headings, quotes or commentary: reply with the description only."
)
IMAGE_INSTRUCTION = (
    "Frames from the video are attached. Describe what they actually show, using the prompt "
    "only as a hint."
)

DEFAULT_EXAMPLES: list[dict[str, str]] = [
    {
        "prompt": "a dog on a beach",
        "caption": (
            "A golden retriever with a wet, sandy coat bounds along the edge of a wide beach, kicking "
            "up sprays of water as small waves roll in around its paws. It stops, shakes itself off, "
            "and trots toward the camera with its tongue out. The beach stretches away under a pale "
            "late-afternoon sky, with soft dunes and scattered driftwood in the background. The camera "
            "tracks alongside at a low angle in a smooth medium shot, then slowly pushes in as the dog "
            "approaches. Photorealistic, warm golden-hour light, shallow depth of field, gentle film grain."
        ),
    },
    {
        "prompt": "city at night, rain",
        "caption": (
            "Rain falls steadily over a dense city street at night, the wet asphalt reflecting streaks of "
            "red, blue and amber neon from shop signs and passing cars. Pedestrians with dark umbrellas "
            "cross at an intersection while a yellow taxi slows, its headlights cutting through the "
            "drizzle and mist. Tall buildings with lit windows rise into low clouds. The camera is static "
            "at street level with a wide lens, then slowly tilts up toward the skyline. Cinematic, moody "
            "and high contrast, with deep shadows, teal and orange colour grading and visible raindrops "
            "in the foreground."
        ),
    },
    {
        "prompt": "a red ball rolls left",
        "caption": (
            "A glossy red rubber ball rolls steadily from the right side of the frame to the left across "
            "a smooth light-grey floor, its highlight sliding over the curved surface as it turns. It "
            "slows slightly as it travels, casting a soft, short shadow beneath it. The background is a "
            "plain, evenly lit studio wall with no other objects, so the motion is easy to follow. The "
            "camera is locked off in a wide shot at table height, perfectly still. Clean, minimal, "
            "photorealistic product-style rendering with soft diffuse lighting and crisp focus."
        ),
    },
]


@dataclass
class RewriteResult:
    """One prompt's outcome. ``text`` is always usable: the original prompt on fallback."""

    text: str
    original: str
    status: str  # "rewritten" | "cached" | "fallback" | "identity"
    error: str | None = None


class RewriteError(Exception):
    """A backend failure; ``retryable=False`` skips the remaining retries (e.g. HTTP 401)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


# ----------------------------------------------------------------------------- output validation

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)  # reasoning models; unterminated = truncated
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course|absolutely|great)\b[,.!]?\s*)?"
    r"(?:here(?:'s|\u2019s| is| are)|below is)\b[^:\n]{0,100}:\s*",
    re.I,
)
_LABEL = re.compile(
    r"^(?:(?:rewritten|expanded|dense|detailed|enhanced|final|new|video)\s+)?"
    r"(?:prompt|caption|description|answer|output)\s*:\s*",
    re.I,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# Degenerate-loop check: real 80-120 word captions have well over half their words distinct;
# a model stuck repeating itself has a handful. Only applied from 20 words on.
_LOOP_MIN_WORDS = 20
_LOOP_MIN_UNIQUE = 0.2


def _strip_control(text: str) -> str:
    # Whitespace controls (\t \n \r ...) become spaces; other controls (Cc), format characters
    # (Cf: zero-width, bidi overrides), private-use (Co) and surrogates (Cs) are dropped.
    return "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Co", "Cs")
    )


def _cap_words(text: str, min_words: int, max_words: int) -> str:
    words = text.split(" ")
    if len(words) <= max_words:
        return text
    text = " ".join(words[:max_words])
    # Prefer ending on a full sentence if that keeps at least min_words words.
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and len(text[: ends[-1]].split()) >= min(min_words, max_words):
        return text[: ends[-1]]
    return text.rstrip(",;:-") + "."


def clean_output(text: str, max_words: int = 120, max_chars: int = 2000, min_words: int = 80) -> str:
    """Normalises a model's reply into one caption; returns "" when nothing usable is left.

    Strips ``<think>`` blocks, control/format characters, markdown emphasis, "Here is..." and
    "Caption:" preambles and wrapping quotes; collapses whitespace; caps at ``max_words`` words
    (backing off to a sentence end when one leaves at least ``min_words``) and ``max_chars``;
    rejects degenerate loops (fewer than 20% distinct words in 20 or more).
    """
    if not isinstance(text, str):
        return ""
    text = _THINK.sub(" ", text)
    text = _strip_control(text)
    text = text.replace("**", "").replace("__", "")
    text = " ".join(text.split())
    for _ in range(3):  # "Sure! Here is the caption: Caption: "..."" peels in a few passes
        before = text
        text = _PREAMBLE.sub("", text)
        text = _LABEL.sub("", text)
        text = text.lstrip("-*\u2022 ").strip()
        while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
        if text == before:
            break
    text = _cap_words(text, min_words, max_words)
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    if not any(ch.isalnum() for ch in text):
        return ""
    tokens = text.lower().split()
    if len(tokens) >= _LOOP_MIN_WORDS and len(set(tokens)) < _LOOP_MIN_UNIQUE * len(tokens):
        return ""  # a decoding loop ("a cat a cat a cat ..."), not a caption
    return text


def _sha256(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- the base class


class Rewriter:
    """Shared behaviour of all re-writer backends (see the module docstring).

    Args:
        system_prompt: instructions for model backends; ``{min_words}``/``{max_words}`` are
            filled in. None: ``DEFAULT_SYSTEM_PROMPT``.
        examples: few-shot ``[{"prompt": short, "caption": dense}, ...]``. None: the defaults;
            [] for none.
        min_words, max_words: target length of a rewrite; output is capped at ``max_words``.
        temperature: sampling temperature (0 = greedy/deterministic).
        timeout_s: per-request timeout, enforced by the backend.
        max_retries: retries after the first attempt (so at most ``1 + max_retries`` calls).
        backoff_s: first retry delay; doubles on each retry (with up to 25% jitter).
        concurrency: worker threads for ``rewrite`` batches.
        cache_dir: on-disk cache folder; None disables caching.
        max_chars: hard cap on output characters.
    """

    backend: str = "base"
    # True for backends whose output is a pure function of the prompt (no network, no
    # sampling): a failure would repeat itself, so it is not retried.
    deterministic: bool = False

    def __init__(
        self,
        system_prompt: str | None = None,
        examples: list[dict] | None = None,
        min_words: int = 80,
        max_words: int = 120,
        temperature: float = 0.7,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 4,
        cache_dir: str | None = None,
        max_chars: int = 2000,
    ):
        name = type(self).__name__
        if not 1 <= min_words <= max_words:
            raise SoraError(f"{name}: need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}")
        if temperature < 0:
            raise SoraError(f"{name}: temperature={temperature} must be >= 0")
        if timeout_s <= 0:
            raise SoraError(f"{name}: timeout_s={timeout_s} must be > 0")
        if max_retries < 0:
            raise SoraError(f"{name}: max_retries={max_retries} must be >= 0")
        if backoff_s < 0:
            raise SoraError(f"{name}: backoff_s={backoff_s} must be >= 0")
        if concurrency < 1:
            raise SoraError(f"{name}: concurrency={concurrency} must be >= 1")
        if max_chars < 1:
            raise SoraError(f"{name}: max_chars={max_chars} must be >= 1")
        examples = DEFAULT_EXAMPLES if examples is None else list(examples)
        for i, ex in enumerate(examples):
            if not (isinstance(ex, dict) or hasattr(ex, "keys")) or not {"prompt", "caption"} <= set(ex.keys()):
                raise SoraError(f"{name}: examples[{i}] must be a mapping with 'prompt' and 'caption' keys")

        self._system_prompt_template = system_prompt
        self.system_prompt = (DEFAULT_SYSTEM_PROMPT if system_prompt is None else str(system_prompt)).replace(
            "{min_words}", str(min_words)
        ).replace("{max_words}", str(max_words))
        self.examples = [{"prompt": str(ex["prompt"]), "caption": str(ex["caption"])} for ex in examples]
        self._examples_given = examples is not DEFAULT_EXAMPLES
        self.min_words = int(min_words)
        self.max_words = int(max_words)
        self.temperature = float(temperature)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.concurrency = int(concurrency)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.max_chars = int(max_chars)

        from sora_train.rewrite.cache import RewriteCache  # cache imports this module's helpers

        self.cache = RewriteCache(self.cache_dir) if self.cache_dir is not None else None
        self._lock = threading.Lock()
        self._warnings = 0
        self.stats: dict[str, int] = {}
        self.reset_stats()

    # -- what subclasses provide ------------------------------------------------------------

    @property
    def model_id(self) -> str | None:
        """The model that produces outputs (None for model-free backends)."""
        return None

    def _generate(self, prompt: str, images: list[bytes] | None) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _identity_extra(self) -> dict[str, Any]:
        """Backend options that change outputs (never secrets, never machine-local paths)."""
        return {}

    def _backend_config(self) -> dict[str, Any]:
        """Backend constructor kwargs for ``config()`` (never secrets)."""
        return {}

    def _redact(self, text: str) -> str:
        """Removes secrets from an error message before it is logged or returned."""
        return text

    # -- identity, config, repr -------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What defines this backend's outputs; part of the cache key. Contains no secrets."""
        return {
            "backend": self.backend,
            "model": self.model_id,
            "system_prompt_sha256": _sha256({"system": self.system_prompt, "examples": self.examples}),
            "temperature": self.temperature,
            "min_words": self.min_words,
            "max_words": self.max_words,
            "max_chars": self.max_chars,
            **self._identity_extra(),
        }

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor kwargs (recorded in a shard set's index.json)."""
        shared = constructor_kwargs(
            self, Rewriter, system_prompt=self._system_prompt_template, examples=self.examples if self._examples_given else None
        )
        return {**self._backend_config(), **shared}

    def __repr__(self) -> str:
        cfg = self.config()
        cfg["system_prompt"] = "default" if cfg["system_prompt"] is None else f"<{len(self.system_prompt)} chars>"
        cfg["examples"] = len(self.examples)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"

    # -- prompts ----------------------------------------------------------------------------

    def messages(self, prompt: str, with_images: bool = False) -> list[dict[str, str]]:
        """Chat messages: system prompt, few-shot examples as user/assistant turns, the prompt."""
        msgs = [{"role": "system", "content": self.system_prompt}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": ex["prompt"]})
            msgs.append({"role": "assistant", "content": ex["caption"]})
        user = prompt if not with_images else f"{IMAGE_INSTRUCTION}\n\nPrompt: {prompt}"
        msgs.append({"role": "user", "content": user})
        return msgs

    def cache_key(self, prompt: str, images: list[bytes] | None = None) -> str:
        image_hashes = [hashlib.sha256(bytes(im)).hexdigest() for im in images or []]
        return _sha256({"prompt": prompt, "images": image_hashes, "identity": self.identity()})

    # -- stats ------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with self._lock:
            self.stats.clear()
            self.stats.update({s: 0 for s in STATUSES})
            self.stats["retries"] = 0

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + n

    # -- the work ---------------------------------------------------------------------------

    def rewrite_one(self, prompt: str, images: list[bytes] | None = None) -> RewriteResult:
        """Rewrites one prompt. Never raises: any failure returns the original text."""
        try:
            return self._rewrite_one(prompt, images)
        except Exception as e:  # noqa: BLE001 - last line of defence for data jobs
            original = prompt if isinstance(prompt, str) else ("" if prompt is None else str(prompt))
            return self._fallback(original, f"{type(e).__name__}: {e}")

    def _rewrite_one(self, prompt: str, images: list[bytes] | None) -> RewriteResult:
        if not isinstance(prompt, str):
            prompt = "" if prompt is None else str(prompt)
        images = list(images) if images else None
        if not prompt.strip() and not images:
            return self._fallback(prompt, "empty prompt", warn=False)

        key = self.cache_key(prompt, images) if self.cache is not None else None
        if key is not None:
            hit = self.cache.get(key, prompt)
            if hit is not None:
                self._count("cached")
                return RewriteResult(text=hit, original=prompt, status="cached")

        error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                delay = min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                time.sleep(delay * (1 + 0.25 * random.random()))  # jitter spreads out retrying workers
            try:
                raw = self._generate(prompt, images)
            except Exception as e:  # noqa: BLE001 - backends may fail in any way; all are retried or fall back
                error = self._redact(f"{type(e).__name__}: {e}" if not isinstance(e, RewriteError) else str(e))
                log.debug("%s attempt %d/%d failed: %s", self.backend, attempt + 1, self.max_retries + 1, error)
                if self.deterministic or not getattr(e, "retryable", True):
                    break
                continue
            text = clean_output(raw, self.max_words, self.max_chars, self.min_words)
            if text:
                if key is not None:
                    self.cache.put(key, {"text": text, "original": prompt, "identity": self.identity()})
                self._count("rewritten")
                return RewriteResult(text=text, original=prompt, status="rewritten")
            error = "empty output after cleaning"
            if self.deterministic or self.temperature <= 0:
                break  # greedy decoding would repeat the same output
        return self._fallback(prompt, error)

    def _fallback(self, prompt: str, error: str, warn: bool = True) -> RewriteResult:
        error = self._redact(error)
        self._count("fallback")
        with self._lock:
            self._warnings += 1 if warn else 0
            n = self._warnings
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        if warn and n <= _MAX_WARNINGS:
            suffix = " (further fallbacks are logged at debug level)" if n == _MAX_WARNINGS else ""
            log.warning("%s rewrite fell back to the original prompt %r: %s%s", self.backend, short, error, suffix)
        else:
            log.debug("%s rewrite fell back to the original prompt %r: %s", self.backend, short, error)
        return RewriteResult(text=prompt, original=prompt, status="fallback", error=error)

    def rewrite(
        self,
        prompts: list[str],
        images: list[list[bytes]] | None = None,
        progress: bool = False,
    ) -> list[RewriteResult]:
        """Rewrites a batch with ``concurrency`` threads; results are in input order.

        ``images[i]`` (optional) are encoded frames (JPEG/PNG bytes) of prompt i, for visual
        recaptioning with backends that accept images.
        """
        if isinstance(prompts, str):
            raise SoraError(f"{type(self).__name__}.rewrite: prompts must be a list of strings, got a single str")
        prompts = list(prompts)
        if images is not None and len(images) != len(prompts):
            raise SoraError(f"{type(self).__name__}.rewrite: got {len(images)} image lists for {len(prompts)} prompts")
        per_prompt = list(images) if images is not None else [None] * len(prompts)
        results: list[RewriteResult | None] = [None] * len(prompts)
        before = dict(self.stats)

        bar, task = None, None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn(f"rewrite ({self.backend})"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
            task = bar.add_task("rewrite", total=len(prompts))
            bar.start()
        try:
            workers = min(self.concurrency, len(prompts))
            if workers <= 1:
                for i, (p, im) in enumerate(zip(prompts, per_prompt)):
                    results[i] = self.rewrite_one(p, im)
                    if bar is not None:
                        bar.advance(task)
            else:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"rewrite-{self.backend}") as pool:
                    futures = {pool.submit(self.rewrite_one, p, im): i for i, (p, im) in enumerate(zip(prompts, per_prompt))}
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()  # rewrite_one never raises
                        if bar is not None:
                            bar.advance(task)
        finally:
            if bar is not None:
                bar.stop()

        delta = {k: self.stats.get(k, 0) - before.get(k, 0) for k in STATUSES}
        if prompts:
            log.info(
                "rewrite (%s): %d prompts: %s",
                self.backend,
                len(prompts),
                ", ".join(f"{v} {k}" for k, v in delta.items() if v),
            )
        return results  # type: ignore[return-value]
