"""Tiny random-initialized Hugging Face models saved to folders, with tokenizers trained offline on a few sentences.

Nothing is downloaded: the configs are written here, the weights are random, and the tokenizers are trained with
the ``tokenizers`` library on :data:`SENTENCES` (byte-level BPE for the decoders, WordPiece for BERT) and wrapped in
``PreTrainedTokenizerFast``, so ``from_pretrained(folder)`` finds everything it needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "A number format decides how many bits each value keeps.",
    "Quantization maps real values to a small set of codes.",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
    "Every layer of the model reads the residual stream.",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Scaling factors fit a tensor into the range of the format.",
]


def _bpe_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def _wordpiece_tokenizer(vocab_size: int = 200):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(SENTENCES * 4, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def save(model, tokenizer, folder: Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpt2(folder: Path, layers: int = 2, width: int = 32) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(n_layer=layers, n_head=2, n_embd=width, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=eos, eos_token_id=eos)
    return save(GPT2LMHeadModel(config).eval(), tokenizer, folder)


def llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                         bos_token_id=eos, eos_token_id=eos)
    return save(LlamaForCausalLM(config).eval(), tokenizer, folder)


def _bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                      **extra)


def bert_mlm(folder: Path) -> Path:
    from transformers import BertForMaskedLM

    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    return save(BertForMaskedLM(_bert_config(tokenizer)).eval(), tokenizer, folder)


def bert_encoder(folder: Path) -> Path:
    from transformers import BertModel

    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    return save(BertModel(_bert_config(tokenizer)).eval(), tokenizer, folder)


def bert_classifier(folder: Path, labels: int = 3) -> Path:
    from transformers import BertForSequenceClassification

    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    config = _bert_config(tokenizer, num_labels=labels)
    return save(BertForSequenceClassification(config).eval(), tokenizer, folder)


def bert_token_classifier(folder: Path) -> Path:
    """A kind fewbit cannot score (per-token labels)."""
    from transformers import BertForTokenClassification

    tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(0)
    return save(BertForTokenClassification(_bert_config(tokenizer, num_labels=2)).eval(), tokenizer, folder)
