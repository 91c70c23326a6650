"""A client's steps and learning-rate schedule (``train.schedule``, ``train.warmup_steps``), micro-batch weights, gradient
checkpointing. Micro-batches through the engine: tests/training/test_micro_batches.py."""

import math

import pytest
import torch
from tiny_models import VOCAB, random_batches, tiny_bert
from transformers import LlamaConfig, LlamaForCausalLM

from fedsim.config import TrainConfig
from fedsim.data import IGNORE_INDEX
from fedsim.modeling import enable_checkpointing
from fedsim.training.schedule import lr_factor
from reference_training import backward, micro_batches


def factors(steps, **train):
    config = TrainConfig(local_steps=steps, **train)
    return [lr_factor(step, config) for step in range(steps)]


def test_constant_with_and_without_warmup():
    assert factors(4) == [1.0] * 4
    assert factors(5, warmup_steps=2) == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_linear_decays_to_zero_after_warmup():
    assert factors(5, schedule="linear") == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert factors(6, schedule="linear", warmup_steps=2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_cosine_follows_half_a_cosine():
    expected = [0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(4)]
    assert factors(4, schedule="cosine") == pytest.approx(expected)
    assert factors(4, schedule="cosine", warmup_steps=1)[0] == 1.0


def test_a_clients_own_step_count_sets_the_decay():
    """With local_epochs a client's steps are its own: the schedule decays over them, not over train.local_steps."""
    config = TrainConfig(local_steps=10, schedule="linear")
    assert [lr_factor(step, config, total_steps=4) for step in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_local_epochs_give_each_client_its_own_steps():
    from fedsim.training.schedule import client_steps

    epochs = TrainConfig(local_steps=None, local_epochs=2, batch_size=8)
    assert [client_steps(epochs, n) for n in (1, 8, 9, 40, 41)] == [2, 2, 4, 10, 12]  # ⌈n/8⌉ × 2
    assert client_steps(TrainConfig(local_steps=None, local_epochs=0.5, batch_size=8), 40) == 3  # ⌈5 × 0.5⌉
    assert client_steps(TrainConfig(local_steps=7), 40) == 7


def test_the_one_of_local_steps_and_local_epochs_given_wins(tmp_path):
    """A setting the user gives wins over the other's default, and a later layer (command line over file) over an
    earlier one; one layer that gives both is one line naming them. The same for privacy.epsilon/noise_multiplier."""
    from fedsim.config import config_from_dict, load_config
    from fedsim.errors import UsageError

    def steps_epochs(config):
        return config.train.local_steps, config.train.local_epochs

    assert steps_epochs(load_config(None, ["train.local_epochs=1"])) == (None, 1.0)  # local_steps: 5 is only a default
    assert steps_epochs(load_config(None, ["local_epochs=2"])) == (None, 2.0)
    assert steps_epochs(load_config(None, ["train={local_epochs: 2}"])) == (None, 2.0)
    assert steps_epochs(config_from_dict({"train": {"local_epochs": 3}})) == (None, 3.0)
    assert steps_epochs(load_config(None, ["train.local_steps=7"])) == (7, None)
    epochs_file = tmp_path / "epochs.yaml"
    epochs_file.write_text("train:\n  local_epochs: 2\n")
    assert steps_epochs(load_config(epochs_file)) == (None, 2.0)
    assert steps_epochs(load_config(epochs_file, ["train.local_steps=4"])) == (4, None)  # the command line over the file
    for layers in ((None, ["train.local_epochs=1", "train.local_steps=3"]), (None, ["train={local_steps: 3, local_epochs: 1}"])):
        with pytest.raises(UsageError, match=r"^train.local_epochs: give one of train.local_steps or train.local_epochs, not both "
                                             r"\(got train.local_steps=3 and train.local_epochs=1\)"):
            load_config(*layers)
    both_file = tmp_path / "both.yaml"
    both_file.write_text("train:\n  local_steps: 3\n  local_epochs: 1\n")
    with pytest.raises(UsageError, match="not both"):
        load_config(both_file)
    with pytest.raises(UsageError, match=r"^train.local_epochs: give one of .* \(both are null\)"):
        load_config(None, ["train.local_steps=null"])
    private = tmp_path / "private.yaml"
    private.write_text("privacy:\n  enabled: true\n  epsilon: 3\n")
    assert load_config(private, ["privacy.noise_multiplier=1.2"]).privacy.epsilon is None
    with pytest.raises(UsageError, match=r"^privacy.epsilon: give one of privacy.epsilon or privacy.noise_multiplier, not both"):
        load_config(private, ["privacy.noise_multiplier=1.2", "privacy.epsilon=2"])


def tiny_causal_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=40, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def causal_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths, the loss on each row's response only (prompts of different lengths)."""
    generator = torch.Generator().manual_seed(seed)
    lengths, prompts = [5, 17, 9, 12, 3, 16], [2, 9, 4, 6, 1, 3]
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (n, p) in enumerate(zip(lengths, prompts)):
        input_ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=generator)
        mask[row, :n] = 1
        labels[row, p:n] = input_ids[row, p:n]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def padded_classification_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    batch = random_batches(seed, batch_size=6, length=14, count=1)[0]
    for row, n in enumerate([14, 3, 8, 5, 11, 2]):
        batch["attention_mask"][row, n:] = 0
        batch["input_ids"][row, n:] = 0
    return batch


def gradients(model, batch, micro_batch_size):
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    loss = backward(model, micro_batches(batch, micro_batch_size))
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["causal", "classification"])
@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_micro_batches_give_the_whole_batch_gradient(kind, micro_batch_size):
    model, batch = (tiny_causal_llama(), causal_batch()) if kind == "causal" else (tiny_bert(), padded_classification_batch())
    whole_loss, whole = gradients(model, batch, None)
    assert whole_loss == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    loss, accumulated = gradients(model, batch, micro_batch_size)
    assert loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.keys() == accumulated.keys() and len(whole) > 10
    for name in whole:
        assert torch.allclose(accumulated[name], whole[name], rtol=1e-4, atol=1e-6), name


def test_micro_batch_weights_are_labelled_token_shares_and_padding_is_cut():
    batch = causal_batch()
    parts = micro_batches(batch, 2)
    tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert [w for _, w in parts] == pytest.approx([(tokens[i:i + 2].sum() / tokens.sum()).item() for i in (0, 2, 4)])
    assert [micro["input_ids"].shape[1] for micro, _ in parts] == [17, 12, 16]  # each pair's longest row
    unlabelled = {**batch, "labels": batch["labels"].clone()}
    unlabelled["labels"][:2] = IGNORE_INDEX
    assert len(micro_batches(unlabelled, 2)) == 2  # a micro-batch with nothing to learn from is left out


def test_gradient_checkpointing_gives_the_same_gradient():
    batch = causal_batch(1)
    plain = tiny_causal_llama()
    _, expected = gradients(plain, batch, None)
    model = tiny_causal_llama()
    enable_checkpointing(model)
    model.train()
    _, got = gradients(model, batch, 2)
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name
