#!/usr/bin/env python3
"""Generate a random-weight Llama checkpoint with a BPE tokenizer and a chat template.

One generator for deploykit's demo model (built into the cpu engine image), the tests' model and
the benchmark model. Run with any Python that has torch, transformers and tokenizers (e.g. the
vLLM CPU venv):

    python make_demo_model.py OUT_DIR                  # tiny: the cpu image's demo model, the tests'
    python make_demo_model.py OUT_DIR --size bench     # ~120M params, for benchmarks
    python make_demo_model.py OUT_DIR --size llama3-8b --config-only   # GPU benchmarks

Sizes:
  tiny   hidden 128, intermediate 256, 2 layers, 2 heads (head_dim 64), 1 KV head: vLLM's CPU build
         loads it in seconds. Its answers are random tokens; it proves the plumbing, not quality.
  bench  hidden 1024, intermediate 4096, 8 layers, 16 heads (head_dim 64), 4 KV heads (~120M
         params, bf16). Decoding is bound by weight reads, like a real LLM's.
  llama3-8b  Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 heads of 128,
         8 KV heads, vocabulary 128256): with --config-only no weights are written; vLLM serves it
         with --load-format dummy (random weights, the cost of a real 8B model).
Both use a ~512-token byte-level BPE tokenizer trained on the spot. head_dim is 64 because vLLM's
CPU attention backend needs it. The output is deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
    },
    "bench": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    },
}

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
#: With --think: reasoning markers, and a generation prompt that opens <think> (as DeepSeek-R1's
#: template does), so vLLM's `deepseek_r1` reasoning parser has something to split off.
THINK_TOKENS = ["<think>", "</think>"]

# A plain chat template: one role marker per message, <|end|> after each, and the assistant marker
# as the generation prompt. Generation stops at </s> or <|end|> (generation_config eos ids).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
THINK_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "'<|assistant|>\\n' }}{% endif %}", "'<|assistant|>\\n<think>\\n' }}{% endif %}"
)

_WORDS = (  # noqa: SIM905
    "the a an of to in and or is are was were be been have has had do does did will would can "
    "could should may might must shall maze wall door key room north south east west left right "
    "up down hello world question answer model bridge message session project robot game tutor "
    "light dark red green blue one two three four five six seven eight nine ten time day night "
    "please thank you what why how when where who which this that these those it they we he she "
    "go come see look find take give open close start stop run walk turn move path exit enter"
).split()


def _corpus(n_lines: int = 4000) -> list[str]:
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(k)]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ","]))
    # Digits and punctuation so every byte sequence tokenizes sensibly.
    lines.append("0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ' \" ( ) [ ] { } - _ + = / \\ * & % $ # @")
    return lines


def build_tokenizer(out: Path, think: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (THINK_TOKENS if think else [])
    template = THINK_CHAT_TEMPLATE if think else CHAT_TEMPLATE
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = template
    fast.model_max_length = 1 << 20
    fast.save_pretrained(str(out))
    # Older transformers keep the template only in tokenizer_config.json; write it explicitly too.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg, indent=2))


def cover_vocabulary(out: Path, vocab_size: int) -> None:
    """Give every id up to ``vocab_size`` a token of its own (`` w<id>``), so that whatever a
    random model of a real vocabulary size generates decodes to text: a benchmark's time to
    first token is the first token's, not the first one the ~512-token BPE happens to cover.
    The added entries have no merges, so encoding text never produces them."""
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    have = max(vocab.values()) + 1
    for token_id in range(have, vocab_size):
        vocab[f"\u0120w{token_id}"] = token_id  # byte-level form of " w<id>"
    path.write_text(json.dumps(data, ensure_ascii=False))


def build_model(out: Path, size: str, seed: int, config_only: bool = False) -> int:
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    if SIZES[size].get("vocab_size", 0) > VOCAB_SIZE:
        cover_vocabulary(out, SIZES[size]["vocab_size"])
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    dims = {"vocab_size": len(tok), "head_dim": 64, **SIZES[size]}
    config = LlamaConfig(
        rms_norm_eps=1e-5,
        bos_token_id=tok.convert_tokens_to_ids("<s>"),
        eos_token_id=[tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|end|>")],
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **dims,
    )
    if config_only:
        config.save_pretrained(str(out))
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
        ).save_pretrained(str(out))
        h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * config.head_dim
        per_layer = h * (h + 2 * kv + h) + 3 * h * i  # attention (q, k, v, o) + MLP
        return n * per_layer + 2 * config.vocab_size * h
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    ).save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (created)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--think", action="store_true", help="add <think> tokens; replies open in reasoning"
    )
    parser.add_argument(
        "--config-only", action="store_true", help="no weights (serve with --load-format dummy)"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, think=args.think)
    n = build_model(out, args.size, args.seed, args.config_only)
    what = "config of a" if args.config_only else "random-weight"
    print(f"wrote the {what} {args.size} Llama ({n / 1e6:.1f}M params) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
