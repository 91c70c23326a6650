"""fedsim.modeling: model.dropout switches every dropout of the base model, attention dropout included."""

import torch
from torch import nn

from fedsim.config import load_config
from fedsim.modeling import load_model


def train_mode_logits_twice(model, batch):
    model.train()
    torch.manual_seed(0)
    first = model(**batch).logits
    second = model(**batch).logits
    model.eval()
    return first, second


def dropout_probabilities(model):
    """Every nn.Dropout's p and every float attribute named *dropout* on the modules (functional attention dropout)."""
    values = []
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            values.append(module.p)
        values += [v for k, v in vars(module).items() if "dropout" in k and isinstance(v, float)]
    return values


def test_dropout_zero_makes_training_mode_deterministic(tiny_model_dir):
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    own = load_model(load_config(None, [f"model.name={tiny_model_dir}"]), num_labels=2)
    assert max(dropout_probabilities(own)) == 0.1  # BERT's own
    first, second = train_mode_logits_twice(own, batch)
    assert not torch.equal(first, second)
    off = load_model(load_config(None, [f"model.name={tiny_model_dir}", "model.dropout=0"]), num_labels=2)
    assert off.config.hidden_dropout_prob == 0.0 and off.config.attention_probs_dropout_prob == 0.0
    assert set(dropout_probabilities(off)) == {0.0}
    first, second = train_mode_logits_twice(off, batch)
    assert torch.equal(first, second)


def test_dropout_reaches_llama_attention(tmp_path):
    """Llama keeps attention dropout as a float attribute of each attention layer (no nn.Dropout module)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.3)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    for value, expected in (("null", 0.3), (0, 0.0), (0.2, 0.2)):
        model = load_model(load_config(None, [f"model.name={tmp_path}", "model.task=causal-lm", f"model.dropout={value}"]), num_labels=2)
        assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {expected}


def test_no_layer_is_swapped_for_a_hub_kernel(tmp_path):
    """transformers >= 5.25 swaps its kernel-decorated layers (Llama's RMSNorm, its activation) for Hub kernels at load
    and again at every train()/eval(), unless told not to: a forward set on such a layer is dropped, and on a GPU the
    kernel is code fetched from the Hub, outside the lock. ``load_model`` keeps the layers transformers defines."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(load_config(None, [f"model.name={tmp_path}", "model.task=causal-lm"]), num_labels=2)
    norm, activation = model.model.norm, model.model.layers[0].mlp.act_fn
    norm.forward = activation.forward = lambda hidden: hidden  # as a wrapper or a test may set on a layer
    model.train()
    model.eval()
    assert norm.__dict__.get("forward") is not None and activation.__dict__.get("forward") is not None
    assert not getattr(model, "use_kernels", False)
