"""Tiny tokenizers, templates and rows for the SFT tests, built offline.

`make_hf_tokenizer` trains a byte-level BPE with the `tokenizers` library and saves it through transformers'
`PreTrainedTokenizerFast.save_pretrained` (PLATFORM.md), so the directory is what a converted model ships with.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n", "hello world, how are you today?", "The answer is 42.",
    "Write the body of this function.", "Sure! Here it is:\n    return x * 2\n", "system prompt: be brief",
    "add 3 and 4 gives 7", "tabs\tand  spaces\n\n", "héllo wörld ✓",
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>"]
# A Llama-3-like template: bos, role headers, trimmed contents, <|eot_id|> ends a turn; raise_exception on order.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A Zephyr-like template written over several lines: exercises trim_blocks/lstrip_blocks and eos_token.
ZEPHYR_LIKE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# What each template renders around an assistant turn's content: the trained text is prefix-free content + suffix.
TEMPLATE_TURN_TEXT = {
    "chatml": lambda content, eos: content + "<|im_end|>\n",
    "own": lambda content, eos: content.strip() + "<|eot_id|>",
    "zephyr": lambda content, eos: content + eos + "\n",
}

CONVERSATIONS = [
    [{"role": "user", "content": "add 3 and 4"}, {"role": "assistant", "content": "7"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hello world, how are you today? "},
     {"role": "user", "content": "Write the body of this function."},
     {"role": "assistant", "content": "Sure! Here it is:\n    return x * 2\n"}],
    [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "wörld ✓"},
     {"role": "user", "content": "tabs\tand  spaces"}, {"role": "assistant", "content": "The answer is 42."}],
]


def make_hf_tokenizer(path: Path, vocab_size: int = 320, chat_template: str = LLAMA3_LIKE) -> Path:
    """A byte-level BPE tokenizer directory (bos added by its post-processor, like Llama's) whose own template is
    `chat_template`; eos_token is </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return path


def make_spm_tokenizer(path: Path) -> str:
    """A maxlm sentencepiece model (with the ChatML pieces `maxlm tokenizer train` adds)."""
    from maxlm.data.tokenizer import train_tokenizer

    corpus = path / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(CORPUS):
        (corpus / f"{i}.txt").write_text(text * 20, encoding="utf-8")
    return train_tokenizer(str(corpus / "*.txt"), 400, str(path / "tok.model"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path
