"""Tiny random-initialized transformers models, saved the way people download them (built once per session)."""

from __future__ import annotations

from pathlib import Path

import torch

SEQ, VOCAB = 32, 300  # 300: not a multiple of 128, so the padding to 128 x TP is exercised
FAMILIES = {
    # GPT-2 as released: tanh GeLU (gelu_new), tied embeddings, learned positions; .bin weights
    "gpt2": dict(cls="GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, safetensors=False),
    # GPT-NeoX with a sequential residual and rotary on every channel, untied output layer
    "neox": dict(cls="GPTNeoXConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=SEQ, use_parallel_residual=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                 tie_word_embeddings=False),
    # LLaMA with grouped-query attention (4 heads, 2 key/value heads), LLaMA 3's rope_theta, rms_norm_eps 1e-6
    "llama": dict(cls="LlamaConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=SEQ,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
}


def save_model(family: str, out: Path, seed: int = 0, **changes) -> Path:
    """A random transformers model of `family` (std 0.2 so attention is sharp and a wrong layout would show; norm
    weights and biases random too), saved to `out`."""
    import transformers

    spec = {**FAMILIES[family], **changes}
    cls, safe = getattr(transformers, spec.pop("cls")), spec.pop("safetensors", True)
    torch.manual_seed(seed)
    config = cls(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None, **spec)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    if not safe:  # the older PyTorch format (transformers 5 saves safetensors only; it still reads .bin)
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def probe_tokens(batch: int, seq: int) -> torch.Tensor:
    """A fixed [batch, seq] batch of ids of the vocabulary."""
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(11))
