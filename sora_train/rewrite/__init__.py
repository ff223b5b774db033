"""Caption re-writer: expands short prompts into dense 80-120 word video descriptions.

One interface (``Rewriter.rewrite`` / ``rewrite_one`` -> ``RewriteResult``), four backends:
``IdentityRewriter`` (pass-through), ``TemplateRewriter`` (deterministic, no model),
``OpenAIRewriter`` (any OpenAI-compatible chat server, stdlib HTTP) and ``HFRewriter`` (a local
causal LM via transformers, imported lazily). Configs: ``conf/rewriter/``.
"""

from sora_train.rewrite.base import (
    DEFAULT_EXAMPLES,
    DEFAULT_SYSTEM_PROMPT,
    RewriteError,
    RewriteResult,
    Rewriter,
    clean_output,
)
from sora_train.rewrite.cache import RewriteCache
from sora_train.rewrite.hf_backend import HFRewriter
from sora_train.rewrite.identity import IdentityRewriter
from sora_train.rewrite.openai_backend import OpenAIRewriter
from sora_train.rewrite.template import TemplateRewriter, normalise_prompt

__all__ = [
    "DEFAULT_EXAMPLES",
    "DEFAULT_SYSTEM_PROMPT",
    "HFRewriter",
    "IdentityRewriter",
    "OpenAIRewriter",
    "RewriteCache",
    "RewriteError",
    "RewriteResult",
    "Rewriter",
    "TemplateRewriter",
    "clean_output",
    "normalise_prompt",
]
