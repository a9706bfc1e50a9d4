"""Make the reference checkpoint tests/fixtures/llmcompressor_gptq_w4g64 with llm-compressor itself.

llm-compressor (the tool that writes the compressed-tensors checkpoints vLLM serves) pins transformers 5.17, so
it lives in its own virtual environment, never in holdall's::

    python -m venv /work/lcvenv
    /work/lcvenv/bin/pip install llmcompressor "torch==2.13.0+cpu"
    /work/lcvenv/bin/python benchmarks/make_llmcompressor_fixture.py tests/fixtures/llmcompressor_gptq_w4g64

What it does: builds a tiny random Llama (seeded; 2 layers, hidden 64, MLP 192, vocab 128, bfloat16), runs
llm-compressor's GPTQ on it (int4, symmetric, groups of 64, its default static act-order) with 16 random
calibration sequences of 32 tokens, and saves it compressed (``pack-quantized``). Beside the checkpoint it
writes ``reference_logits.pt``: the logits transformers 5.17 + compressed-tensors computes for a fixed batch of
token ids in the reference environment, so holdall's tests (in holdall's own environment) can check that
reading the checkpoint back gives what the reference stack gives. The whole directory is ~120 KB.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

IDS = torch.tensor([[1, 4, 7, 9, 3, 12, 5, 30, 77, 101, 2, 64], [8, 8, 15, 99, 127, 0, 33, 42, 6, 91, 17, 3]])


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer over made-up words (the checkpoint must ship one for llm-compressor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def main(out: str) -> None:
    torch.set_num_threads(2)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    work = Path(tempfile.mkdtemp(prefix="lc-fixture-"))
    try:
        model.save_pretrained(work / "float")
        tokenizer = _tiny_tokenizer(config.vocab_size)
        tokenizer.save_pretrained(work / "float")
        model = AutoModelForCausalLM.from_pretrained(work / "float", dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        rows = [{"input_ids": torch.randint(3, 128, (32,), generator=gen).tolist(), "attention_mask": [1] * 32}
                for _ in range(16)]
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64),
        )
        start = time.time()
        oneshot(
            model=model, dataset=Dataset.from_list(rows), recipe=GPTQModifier(config_groups={"g0": scheme},
                                                                            ignore=["lm_head"]),
            max_seq_length=32, num_calibration_samples=16, processor=tokenizer,
        )
        seconds = time.time() - start
        target = Path(out)
        tmp = work / "out"
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        for extra in ("recipe.yaml",):  # llm-compressor's own bookkeeping, not part of the checkpoint
            (tmp / extra).unlink(missing_ok=True)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits = reloaded(IDS).logits.float()
        torch.save({"ids": IDS, "logits": logits}, tmp / "reference_logits.pt")
        import compressed_tensors
        import llmcompressor
        import transformers

        (tmp / "reference.json").write_text(json.dumps({
            "made_by": "benchmarks/make_llmcompressor_fixture.py",
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gptq_seconds": round(seconds, 2),
        }, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(target))
        for path in target.iterdir():  # llm-compressor writes its shard owner-only; a fixture is read by anyone
            path.chmod(0o644)
        size = sum(p.stat().st_size for p in target.iterdir())
        print(f"wrote {target} ({size / 1024:.0f} KB) in {seconds:.1f} s of GPTQ")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llmcompressor_gptq_w4g64")
