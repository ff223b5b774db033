"""Re-writer backed by a local causal LM folder through transformers (no server, no download).

    HFRewriter(path="/models/Qwen2.5-1.5B-Instruct", device="cuda", dtype="bfloat16")

Uses the tokenizer's chat template when it has one (system prompt folded into the first user
turn for templates that reject a system role), else a plain few-shot text prompt
("Prompt: ... / Description: ..."). Greedy decoding at ``temperature=0``, sampling otherwise.
``timeout_s`` becomes ``generate(max_time=...)``. Text only: images are ignored with a
warning. One ``generate`` runs at a time (a lock), so ``concurrency`` above 1 buys nothing;
the default is 1. For throughput on many captions, serve the model with vLLM and use the
``openai`` backend instead.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from sora_train.rewrite.base import RewriteError, Rewriter
from sora_train.utils.errors import SoraError
from sora_train.utils.hf import check_hf_dtype, import_transformers
from sora_train.utils.kwargs import constructor_kwargs
from sora_train.utils.logging import get_logger

log = get_logger(__name__)



class HFRewriter(Rewriter):
    """Args:
        path: local folder with a causal LM (``config.json``, weights) and its tokenizer.
        max_new_tokens: generation budget (~1.3 tokens per English word: 120 words ~ 160 tokens).
        dtype: "float32" | "bfloat16" | "float16".
        device: "cpu", "cuda", "cuda:N", or "auto" (cuda when available).
        model_name: name recorded in ``identity()`` (default: the folder name); set it to tell
            apart two fine-tunes saved under the same folder name.
        **kwargs: the shared ``Rewriter`` options (``concurrency`` defaults to 1 here).
    """

    backend = "hf"

    def __init__(
        self,
        path: str,
        max_new_tokens: int = 256,
        dtype: str = "float32",
        device: str = "cpu",
        model_name: str | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("concurrency", 1)
        check_hf_dtype("HFRewriter", dtype)
        if max_new_tokens < 1:
            raise SoraError(f"HFRewriter: max_new_tokens={max_new_tokens} must be >= 1")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise SoraError(f"HFRewriter: path={str(path)!r} is not a folder (expected a local save_pretrained folder)")
        if not (folder / "config.json").is_file():
            raise SoraError(f"HFRewriter: path={str(path)!r} is not a model folder: no config.json")
        super().__init__(**kwargs)
        import torch

        transformers = import_transformers("HFRewriter")

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a usable causal LM folder"
            raise SoraError(f"HFRewriter: path={str(path)!r}: cannot load a causal LM and tokenizer ({e})") from e
        self._torch = torch
        self.path = str(path)
        self.max_new_tokens = int(max_new_tokens)
        self.dtype = dtype
        self.device = device
        self.model_name = model_name or folder.resolve().name
        self._config_sha256 = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.model.requires_grad_(False)
        self._generate_lock = threading.Lock()
        self._warned_images = False
        self._fold_system = False  # set when the chat template rejects a system role

    @property
    def model_id(self) -> str:
        return self.model_name

    def _identity_extra(self) -> dict[str, Any]:
        return {"config_sha256": self._config_sha256, "max_new_tokens": self.max_new_tokens, "dtype": self.dtype}

    def _backend_config(self) -> dict[str, Any]:
        return constructor_kwargs(self, HFRewriter)

    # -- prompt building --------------------------------------------------------------------

    def _plain_prompt(self, prompt: str) -> str:
        lines = [self.system_prompt, ""]
        for ex in self.examples:
            lines += [f"Prompt: {ex['prompt']}", f"Description: {ex['caption']}", ""]
        lines += [f"Prompt: {prompt}", "Description:"]
        return "\n".join(lines)

    def _chat_prompt(self, prompt: str) -> str:
        msgs = self.messages(prompt)
        if self._fold_system:
            system, first = msgs[0]["content"], msgs[1]
            msgs = [{"role": first["role"], "content": f"{system}\n\n{first['content']}"}] + msgs[2:]
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - e.g. Gemma's template raises on a system role
            if self._fold_system:
                raise
            self._fold_system = True
            return self._chat_prompt(prompt)

    # -- generation -------------------------------------------------------------------------

    def _generate(self, prompt: str, images: list[bytes] | None) -> str:
        if images and not self._warned_images:
            self._warned_images = True
            log.warning("hf rewriter is text-only: images are ignored (use the openai backend with a VLM)")
        torch = self._torch
        if getattr(self.tokenizer, "chat_template", None):
            text = self._chat_prompt(prompt)
            enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            enc = self.tokenizer(self._plain_prompt(prompt), return_tensors="pt")
        input_len = enc["input_ids"].shape[1]
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        if limit is not None and input_len + self.max_new_tokens > limit:
            raise RewriteError(
                f"prompt of {input_len} tokens + max_new_tokens={self.max_new_tokens} exceeds the model's {limit} positions",
                retryable=False,
            )
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "max_time": self.timeout_s, "pad_token_id": pad_id}
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature)
        else:
            gen.update(do_sample=False)
        try:
            with self._generate_lock, torch.no_grad():
                out = self.model.generate(**enc, **gen)  # (1, input_len + new)
        except Exception as e:  # noqa: BLE001 - a deterministic failure: retrying would repeat it
            raise RewriteError(f"generate failed: {type(e).__name__}: {e}", retryable=False) from None
        reply = self.tokenizer.decode(out[0, input_len:], skip_special_tokens=True)
        # A base model continues the few-shot pattern: keep only the first description.
        return reply.split("\nPrompt:")[0]
