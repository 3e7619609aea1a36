"""`fpa-generate --checkpoint DIR --prompt TEXT`: continue a prompt with a trained model, on CPU.

DIR is a training checkpoint (any layout: converted in memory to the transformers model `fpa-export hf`
writes) or an exported directory. Decoding is transformers' `generate`: greedy by default, sampling with
`--temperature` > 0 (optionally restricted by `--top-k` / `--top-p`); it stops at the end-of-document token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]  # without the end-of-document token
    text: str  # the decoded continuation
    stopped_at_eod: bool


def sampling_options(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> dict:
    """transformers' generation settings: greedy when temperature is 0; every filter not asked for is off
    (transformers would otherwise apply its default top_k = 50 when sampling)."""
    if temperature < 0:
        raise ValueError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
    if temperature == 0:
        if top_k is not None or top_p is not None:
            raise ValueError("--top-k / --top-p only apply when sampling: add --temperature > 0")
        return {"do_sample": False}
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k={top_k} must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p={top_p} must be in (0, 1]")
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or 0,
            "top_p": 1.0 if top_p is None else top_p}


def generate(model, tokenizer, eod_id: int, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0) -> Generation:
    """Continue `prompt` (an empty prompt starts from the end-of-document token, i.e. a new document)."""
    import torch  # here, not at import: `fpa-generate --help` stays instant
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    options = sampling_options(temperature, top_k, top_p)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) or [eod_id]
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eod_id, pad_token_id=eod_id,
                              num_beams=1, **options)
    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(prompt_ids):]
    new_ids = out.tolist()
    stopped = eod_id in new_ids
    if stopped:
        new_ids = new_ids[: new_ids.index(eod_id)]
    return Generation(prompt_ids, new_ids, tokenizer.decode(new_ids), stopped)
