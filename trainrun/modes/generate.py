"""mode=generate: a sample from a causal language model run (task=causal_lm).

`trainrun mode=generate resume=RUN prompt="def " max_new_tokens=200 temperature=0.8 top_k=40 seed=0` loads the
checkpoint as trainrun.load does (SHA256-verified, weights_only; EMA weights when it has them, LoRA merged), encodes
the prompt with the tokenizer the run was trained with (stored in its meta.json), and draws one token at a time
from softmax(logits / temperature) restricted to the top_k tokens (temperature=0: the arg-max), on a torch
Generator seeded with `seed` only: the same command prints the same text. The context is the last data.block_size
tokens. The sample is printed and written to RUN/generate/<time>/sample.txt with generate.json (the settings, the
checkpoint and its SHA256). No data is read and nothing is trained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from trainrun import checkpoint, distributed
from trainrun.errors import ConfigError


def generate_mode(cfg, run_dir: Path, t0: float) -> Dict[str, Any]:
    from trainrun.build import pick_device
    from trainrun.data.text import tokenizer_from_spec
    from trainrun.inference import load

    if distributed.env_info().enabled:
        raise ConfigError("mode=generate runs in one process: run it without torchrun")
    ckpt = checkpoint.candidates(cfg.resume, Path(cfg.output_root), cfg.run_name)[0]
    loaded = load(ckpt, device=pick_device(cfg.trainer.device))
    if loaded.task != "causal_lm":
        raise ConfigError(f"mode=generate needs a causal language model run (task=causal_lm); {ckpt} was trained "
                          f"with task={loaded.task}")
    spec = (loaded.meta["io"].get("preprocess") or {}).get("tokenizer")
    if not isinstance(spec, dict):
        raise ConfigError(f"{ckpt}: its meta.json names no tokenizer (io.preprocess.tokenizer); it was not trained "
                          "on data=text")
    tokenizer = tokenizer_from_spec(spec)
    prompt = cfg.prompt or "\n"
    ids = tokenizer.encode(prompt)
    context = int(loaded.meta["io"]["input_shape"][0])
    new = sample(loaded.model, ids, cfg.max_new_tokens, context, cfg.temperature, cfg.top_k, cfg.seed,
                 loaded.device)
    text = tokenizer.decode(new)
    _save(run_dir, cfg, ckpt, loaded, prompt, text, len(ids), len(new))
    print(prompt + text, flush=True)
    return {"step": loaded.meta.get("step"), "tokens": len(new), "finished": True}


@torch.no_grad()
def sample(model: torch.nn.Module, ids: List[int], max_new_tokens: int, context: int, temperature: float,
           top_k: Optional[int], seed: int, device: torch.device) -> List[int]:
    """`max_new_tokens` token ids after `ids`, each drawn from the model's next-token distribution (see the module
    doc); the randomness comes from a generator seeded with `seed` alone."""
    if not ids:
        raise ConfigError("prompt: encodes to no tokens; give a non-empty prompt")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    out: List[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -context:])[0, -1].float().cpu()
        nxt = _draw(logits, temperature, top_k, gen)
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def _draw(logits: torch.Tensor, temperature: float, top_k: Optional[int], gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def _save(run_dir: Path, cfg, ckpt: Path, loaded, prompt: str, text: str, prompt_tokens: int, new: int) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sample.txt").write_text(prompt + text, encoding="utf-8")
    record = {"checkpoint": str(Path(ckpt).resolve()), "step": loaded.meta.get("step"),
              "sha256": loaded.meta.get("sha256"), "weights": loaded.weights, "prompt": prompt,
              "prompt_tokens": prompt_tokens, "new_tokens": new, "max_new_tokens": cfg.max_new_tokens,
              "temperature": cfg.temperature, "top_k": cfg.top_k, "seed": cfg.seed}
    (run_dir / "generate.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
