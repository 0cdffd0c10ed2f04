"""Character-level tokenizers and tiny Qwen2 models that are built locally, with no hub access.

The test suite builds its fixture model with these, and the embedded model that the recipes train by default was
pre-trained from the same builders. A character vocabulary keeps the model small enough to ship inside the package
and to train on a CPU.

The tokenizer is a `Qwen2Tokenizer` whose vocabulary holds the 256 byte symbols and no merges, so every byte (every
ASCII character) is one token. Using Qwen2's own tokenizer class matters: `AutoTokenizer` rebuilds Qwen2 tokenizers
from their vocabulary and merges, so any other pipeline would not survive a save and reload next to a Qwen2 config.
"""

from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]

# ChatML, the chat format of the Qwen2.5 models the papers train.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_char_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer (one token per ASCII character) with ChatML special tokens and chat template.

    `<|im_end|>` is the end-of-sequence token and `<pad>` the pad token; the vocabulary has 259 entries.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen2(
    tokenizer: Qwen2Tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for `tokenizer` (about 30k parameters by default)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model
