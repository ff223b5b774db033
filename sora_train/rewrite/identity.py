"""The no-op re-writer: captions pass through unchanged (status "identity").

Use it to train on original captions, or to turn prompt expansion off at sampling time,
without special-casing "no rewriter" anywhere.
"""

from __future__ import annotations

from sora_train.rewrite.base import Rewriter, RewriteResult


class IdentityRewriter(Rewriter):
    backend = "identity"

    def rewrite_one(self, prompt: str, images: list[bytes] | None = None) -> RewriteResult:
        text = prompt if isinstance(prompt, str) else ("" if prompt is None else str(prompt))
        self._count("identity")
        return RewriteResult(text=text, original=text, status="identity")

    def _generate(self, prompt: str, images: list[bytes] | None) -> str:
        return prompt
