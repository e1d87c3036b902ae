"""A random 2-layer, 64-wide Llama with the default target's tokenizer: a model so small that host work shows.

Used to measure the serving path's per-token overhead on a CPU (`bench/decode_path.py --target DIR`), where the real
target's 40 ms step would hide it. Its weights are random: its text means nothing, its timings are what count.

    .venv/bin/python bench/make_tiny_llama.py --out /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdec import models  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (a Hugging Face model directory)")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = models.load_tokenizer(models.DEFAULT_TARGET)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
