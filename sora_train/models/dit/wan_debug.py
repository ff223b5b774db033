"""A tiny random Wan2.1 text-to-video pipeline folder, laid out as the public diffusers ones are.

    write_tiny_wan("/tmp/tiny_wan")   # transformer/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json

It is the `debug` size of the Wan family: the same classes (diffusers `WanTransformer3DModel`,
`AutoencoderKLWan`, transformers `UMT5EncoderModel`, a fast tokenizer) at a few thousand
parameters each, so tests and the docs' dry runs exercise exactly the code paths a real
Wan2.1-T2V-1.3B-Diffusers folder takes, on a CPU, in seconds, with nothing downloaded.
Written by `WanPipeline.save_pretrained`, so diffusers' own `WanPipeline.from_pretrained`
reads it back (the parity tests compare against it).
"""

from __future__ import annotations

from pathlib import Path

import torch

# A word-level vocabulary: enough words for the test prompts and the shapes world's captions.
WORDS = (
    "a the an of in on to and with at from is moving rolls slides left right up down towards away "
    "red green blue yellow white black orange purple cyan magenta gray pink "
    "ball circle square triangle star cube object shape small large big tiny "
    "cat dog car person walks runs jumps flies sky sea field city night day camera pan zoom "
    "blurry low quality static worst ugly video clip scene"
).split()
# Text length of the tiny model; the real ones use 512 (WanPipeline's max_sequence_length).
TINY_TEXT_LEN = 32


def write_tiny_tokenizer(folder: str | Path, model_max_length: int = 512):
    """A lower-casing word-level fast tokenizer that appends ``</s>`` as UMT5's does (pad id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
    fast.save_pretrained(str(folder))
    return fast


def tiny_wan_pipeline(seed: int = 0, shift: float = 3.0):
    """A diffusers ``WanPipeline`` of tiny random models (eval mode, float32)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tiny_tokenizer(tmp)
    text_dim = 16
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    # 16 latent channels, 8x spatial / 4x temporal compression: Wan's own factors at a tiny width.
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    for m in (text_encoder, vae, transformer):
        m.eval()
    return pipe


def write_tiny_wan(folder: str | Path, seed: int = 0, shift: float = 3.0) -> Path:
    """Save a tiny random Wan2.1 T2V pipeline (see the module docstring) to ``folder``."""
    folder = Path(folder)
    tiny_wan_pipeline(seed, shift).save_pretrained(str(folder), safe_serialization=True)
    return folder


__all__ = ["TINY_TEXT_LEN", "WORDS", "tiny_wan_pipeline", "write_tiny_tokenizer", "write_tiny_wan"]
