"""The tiny preset's tokenizer: a byte-level BPE trained on the demo sample's own text, with
Qwen3's special tokens in Qwen3's roles, so the code paths that read eos/pad ids from the
tokenizer are the real ones. Importing this file does nothing."""
from transformers import PreTrainedTokenizerFast

# Qwen3's special tokens: pad `<|endoftext|>` is a real, EOS-like token (so masks never come
# from `ids != pad`); the EOS that ends every sequence is `<|im_end|>`.
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts, vocab_size: int = 16384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen3's special tokens, trained on `texts`. 16,384 tokens
    make most words one token, which the tiny model matches far better than word pieces
    (README, the tiny testbed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, add_eos_token=True)
