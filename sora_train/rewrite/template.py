"""A deterministic, model-free re-writer: normalise the prompt, then expand it from a template.

The prompt itself (cleaned: whitespace, casing, punctuation) stays the first sentence, so
nothing the user asked for is lost. It is followed by one sentence per slot — subject,
action, scene, lighting, camera, lens, style, mood — picked from fixed phrase pools by a
``random.Random`` seeded with the prompt's sha256, so the same prompt always expands the same
way on every machine. Required slots (subject, action, scene, camera, style) are added when
they fit in ``max_words``; optional ones only until ``min_words`` is reached.

Good for the demo, for tests and as a baseline; the sentences are generic and never
contradict the prompt, but they add no real information. Bump ``TEMPLATE_VERSION`` whenever
the pools change so caches keyed on this backend are invalidated.
"""

from __future__ import annotations

import hashlib
import random
import re

from sora_train.rewrite.base import RewriteError, Rewriter

TEMPLATE_VERSION = "template-v1"

# (slot, required) in output order.
_SLOTS = [
    ("subject", True),
    ("action", True),
    ("scene", True),
    ("lighting", False),
    ("camera", True),
    ("lens", False),
    ("style", True),
    ("mood", False),
]

_POOLS: dict[str, list[str]] = {
    "subject": [
        "The main subject is rendered in crisp detail, its shape, texture and colours clearly defined against the background.",
        "The subject stays clearly readable throughout, with well defined edges, accurate colours and fine surface detail.",
        "Every part of the subject is sharply resolved, from its outline to the small details of its surface.",
        "The subject is the clear focal point of the frame, distinct in colour and form from everything around it.",
    ],
    "action": [
        "Its movement is smooth and continuous, unfolding naturally over the length of the clip without abrupt cuts.",
        "The motion is steady and physically plausible, with consistent speed and direction from the first frame to the last.",
        "The action plays out in one continuous take, each movement flowing naturally into the next.",
        "Movement is fluid and deliberate, easy to follow, with no sudden jumps or changes of direction.",
    ],
    "scene": [
        "The setting around it is coherent and uncluttered, with a softly detailed background that gives a clear sense of depth and place.",
        "The surroundings are simple and consistent, so the background never distracts from what is happening in the foreground.",
        "The environment is calm and believable, with background elements that stay stable and in place throughout the shot.",
        "The scene has a clear foreground and background, with enough environmental detail to ground the action in a real place.",
    ],
    "lighting": [
        "Soft natural daylight falls across the scene, producing gentle shadows and even, balanced exposure.",
        "Warm golden-hour light rakes in from the side, adding long shadows and a soft glow to the edges.",
        "Cool, diffuse overcast light wraps evenly around every surface, keeping the contrast low and the shadows soft.",
        "Bright, clean light from above gives crisp highlights and short, well defined shadows.",
    ],
    "camera": [
        "The camera holds a steady medium shot at eye level, keeping the subject centred in the frame.",
        "A slow, smooth tracking shot follows the subject from the side, keeping it in the middle of the frame.",
        "The camera begins in a wide shot and slowly pushes in, ending closer on the subject.",
        "A static wide shot on a locked-off tripod frames the whole action with room on every side.",
    ],
    "lens": [
        "A 35mm lens with a shallow depth of field lets the background fall into a gentle blur.",
        "A 50mm lens keeps perspective natural, with the subject in sharp focus and the background slightly soft.",
        "A wide-angle lens keeps both the subject and its surroundings in focus from front to back.",
        "A long lens compresses the distance between the subject and the background, isolating it cleanly.",
    ],
    "style": [
        "The look is photorealistic and cinematic, with natural colour grading, fine film grain and high dynamic range.",
        "The style is clean and realistic, with true-to-life colours, crisp focus and smooth, high frame-rate motion.",
        "It has the polished look of a high-end documentary, with rich but natural colours and sharp detail.",
        "The footage looks like modern digital cinema, with balanced contrast, subtle colour grading and no visible noise.",
    ],
    "mood": [
        "The overall mood is calm and observational, inviting the viewer to simply watch the moment unfold.",
        "The atmosphere is quiet and focused, with nothing in the frame competing for attention.",
        "The feeling is light and pleasant, like a carefully composed moment captured in real time.",
        "The tone is clear and matter-of-fact, presenting the scene exactly as it happens.",
    ],
}

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_PUNCT = re.compile(r"([,.;:!?])\1+")
_MISSING_SPACE_AFTER = re.compile(r"([,;:!?])(?=[^\W\d_])")  # "a,b" -> "a, b"; not "3:45", not "http://"
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def normalise_prompt(prompt: str) -> str:
    """Whitespace collapsed, spacing around punctuation fixed, SHOUTING lowercased, first
    letter capitalised, ending in a full stop."""
    text = " ".join(prompt.split()).strip(_QUOTES + " ")
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _MISSING_SPACE_AFTER.sub(r"\1 ", text)
    letters = [c for c in text if c.isalpha()]
    if len(letters) > 3 and all(c.isupper() for c in letters):
        text = text.lower()
    text = text.strip(" ,;:-")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def _words(text: str) -> int:
    return len(text.split())


class TemplateRewriter(Rewriter):
    """Deterministic template expansion (no model). ``temperature`` and the system prompt are
    accepted for a uniform config but unused."""

    backend = "template"
    deterministic = True

    @property
    def model_id(self) -> str:
        return TEMPLATE_VERSION

    def _generate(self, prompt: str, images: list[bytes] | None) -> str:
        core = normalise_prompt(prompt)
        if not any(c.isalnum() for c in core):
            raise RewriteError("prompt has no words to expand", retryable=False)
        if _words(core) >= self.min_words:
            return core  # already dense; the base class caps it at max_words
        seed = int.from_bytes(hashlib.sha256(core.lower().encode("utf-8")).digest()[:8], "big")
        rng = random.Random(seed)
        picks = {slot: rng.choice(_POOLS[slot]) for slot, _ in _SLOTS}  # always draw every slot: stable choices

        chosen: set[str] = set()
        total = _words(core)
        for slot, required in _SLOTS:
            if required and total + _words(picks[slot]) <= self.max_words:
                chosen.add(slot)
                total += _words(picks[slot])
        for slot, required in _SLOTS:
            if not required and total < self.min_words and total + _words(picks[slot]) <= self.max_words:
                chosen.add(slot)
                total += _words(picks[slot])
        return " ".join([core] + [picks[slot] for slot, _ in _SLOTS if slot in chosen])
