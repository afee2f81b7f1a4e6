"""Generate deploykit's demo model at image build time: a tiny Llama with random weights.

The point is a model that vLLM's CPU build loads in seconds and serves through the OpenAI API with
a real tokenizer and a chat template, so the whole stack (broker, bridge, engine) runs on any machine.
Its answers are random tokens; it proves the plumbing, not the quality.

Shape (FACTS.md): hidden 128, 2 layers, 2 attention heads of head_dim 64 (vLLM's CPU attention
needs head_dim 64), 1 KV head, vocabulary ~512 from a byte-level BPE trained here on a built-in text.

Usage: python make_demo_model.py OUT_DIR   (deterministic: fixed seed, fixed corpus)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# A chat template in the style of the tokens above; `add_generation_prompt` opens the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CORPUS = """\
The maze has four doors. The player walks north, then east, and finds a key under the stone.
A robot asks the tutor how to add two numbers. The tutor answers: add the ones, then the tens.
Hello! How can I help you today? I am a small demo model served by vLLM behind an MQTT bridge.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Questions arrive over MQTT, the bridge forwards them to the engine, and replies go back to clients.
One, two, three, four, five, six, seven, eight, nine, ten. Yes. No. Maybe. Thank you. Goodbye.
"""


def train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    model = build_model(len(tokenizer), ids("<s>"), ids("<|end|>"), ids("</s>"))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Generation defaults vLLM reads; stop at <|end|> so replies end.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids("<s>"), "eos_token_id": ids("<|end|>")}, indent=2) + "\n"
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"demo model: {n} parameters, vocabulary {len(tokenizer)}, written to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_demo_model.py OUT_DIR")
    main(Path(sys.argv[1]))
