"""The engine's local rules without Ray: FedProx's proximal gradient and SCAFFOLD's control variates act on each client's
own slice (a cohort of K gives each client what it gets alone), and compute what their papers define. float64."""

import pytest
import torch
from test_engine import FLOAT64, assert_same_upload, client_tables, initial_state, one_thread, prepared

from fedsim.config import TrainConfig
from fedsim.data import TokenizedRows
from fedsim.modeling import load_tokenizer
from fedsim.training.engine import train_clients
from fedsim.training.fedprox import Proximal
from fedsim.training.losses import record_losses
from fedsim.training.scaffold import PREFIX, ControlVariates, server_update

__all__ = ["one_thread"]  # a fixture, used by name
SETTINGS = TrainConfig(local_steps=3, batch_size=4, lr=5e-3, weight_decay=0.01)


def setup(tiny_model_dir, method_name="fed-sb"):
    config, model, method = prepared(tiny_model_dir, method_name)
    rows = [TokenizedRows(table, load_tokenizer(config), 24) for table in client_tables()][:4]
    return model, method, initial_state(model, method, rows[3]), rows


def train(model, method, state, rows, rules, settings=SETTINGS, first=0):
    """Clients ``first``, ``first + 1``, … (their rows ``rows``), each with its own batch seed."""
    K = len(rows)
    return train_clients(model, method, 0, [state] * K, [None] * K, [r.batches(4, 10 + first + i) for i, r in enumerate(rows)],
                         settings, [settings.local_steps] * K, seed=7, rules=rules)


@pytest.mark.parametrize("method_name", ["fed-sb", "fedit"])
def test_a_cohort_gives_each_client_its_own_rules(tiny_model_dir, method_name):
    """FedProx and SCAFFOLD (with non-zero c and c_i) in one cohort of 4 and in 4 cohorts of one: the same uploads, Δc, c_i."""
    model, method, state, rows = setup(tiny_model_dir, method_name)
    generator = torch.Generator().manual_seed(0)
    trained = method.trainable_parameters(model, 0)
    server = {key: 0.01 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for key, p in trained.items()}
    own = [{key: 0.01 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for key, p in trained.items()} for _ in rows]
    together = train(model, method, state, rows, [Proximal(0.1), ControlVariates(server, own)])
    alone = [train(model, method, state, [rows[k]], [Proximal(0.1), ControlVariates(server, [own[k]])], first=k)[0]
             for k in range(len(rows))]
    plain = train(model, method, state, rows, [])
    for k, (a, b) in enumerate(zip(together, alone)):
        assert_same_upload(a.upload, b.upload, f"client {k}", FLOAT64)
        assert_same_upload(a.kept, b.kept, f"client {k} kept", FLOAT64)
        assert {key for key in a.upload if key.startswith(PREFIX)} == {PREFIX + key for key in trained}
        assert any(not torch.allclose(a.upload[key], plain[k].upload[key]) for key in plain[k].upload)


def test_proximal_gradient_is_mu_times_the_distance_from_the_start(tiny_model_dir):
    model, method, state, rows = setup(tiny_model_dir)
    rule = Proximal(0.3)
    start = {"x": torch.zeros(2, 3, dtype=torch.float64)}
    rule.begin(start, [{"x": torch.Size([3])}] * 2)
    now = {"x": torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], dtype=torch.float64)}
    assert torch.equal(rule.correction(now, {"x": torch.zeros(2, 3, dtype=torch.float64)}, [0, 1])["x"], 0.3 * now["x"])
    zero = train(model, method, state, rows[:2], [Proximal(0.0)])
    none = train(model, method, state, rows[:2], [])
    for a, b in zip(zero, none):  # μ = 0 adds exact zeros
        assert all(torch.equal(a.upload[key], b.upload[key]) for key in b.upload)


def test_a_clients_control_variate_is_the_mean_of_its_gradients(tiny_model_dir):
    """One step from c = c_i = 0: the correction is zero (the upload is the plain one, bit for bit) and c_i⁺ is the
    gradient of the client's mean loss at the start, as autograd gives it on the model itself; Δc_i = c_i⁺."""
    model, method, state, rows = setup(tiny_model_dir)
    one_step = TrainConfig(local_steps=1, batch_size=4, lr=5e-3)
    (result,) = train(model, method, state, rows[:1], [ControlVariates({}, [{}])], one_step)
    (plain,) = train(model, method, state, rows[:1], [], one_step)
    assert all(torch.equal(result.upload[key], plain.upload[key]) for key in plain.upload)
    method.load_state(model, state)
    params = method.trainable_parameters(model, 0)
    batch = next(rows[0].batches(4, 10))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.train()
    loss = record_losses(model(**inputs).logits, batch["labels"], "classification").mean()
    gradients = torch.autograd.grad(loss, list(params.values()))
    model.eval()
    for (key, _), gradient in zip(params.items(), gradients):
        assert torch.allclose(result.kept[PREFIX + key], gradient, rtol=1e-9, atol=1e-14), key
        assert torch.equal(result.upload[PREFIX + key], result.kept[PREFIX + key])


def test_server_control_variate_adds_the_mean_change_over_all_clients():
    state = {"a": torch.zeros(4, 2)}
    server = server_update({}, [{PREFIX + "a": torch.ones(3, 2)}, {PREFIX + "a": 2 * torch.ones(4, 2)}, {"a": torch.ones(4, 2)}], 10, state)
    expected = torch.full((4, 2), 0.3)
    expected[3] = 0.2  # the rank-3 client's Δc is zero-padded
    assert torch.allclose(server["a"], expected)
    again = server_update(server, [{PREFIX + "a": torch.ones(4, 2)}], 10, state)
    assert torch.allclose(again["a"], expected + 0.1)
