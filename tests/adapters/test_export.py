"""A fedsim state exported as a PEFT adapter, loaded by stock PEFT, reproduces fedsim's model."""

import pytest
import torch
from peft import PeftModel
from tiny_models import BERT_TARGETS, LLAMA_TARGETS, random_batches, tiny_bert, tiny_llama, make_method, train_one

from fedsim.adapters import accumulate_gradients, target_linear_names
from fedsim.adapters.export import export_peft

from fedsim.methods import Upload
from fedsim.config import TrainConfig
from tiny_models import cycle

MODELS = {"bert": (tiny_bert, BERT_TARGETS), "llama": (tiny_llama, LLAMA_TARGETS)}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method_name", ["fed-sb", "fedit", "fedex-lora", "flora", "ffa-lora"])
def test_stock_peft_loads_the_export_with_the_same_logits(tmp_path, model_name, method_name):
    factory, targets = MODELS[model_name]
    factory().save_pretrained(tmp_path / "base")  # the base checkpoint a user would load

    def base():
        return type(factory()).from_pretrained(tmp_path / "base").eval()

    model = base()
    method = make_method(method_name, rank=4, alpha=8, seed=1)
    grads = accumulate_gradients(model, target_linear_names(model, targets), random_batches(9, count=2)) if method.needs_init_gradients else None
    method.prepare(model, targets)
    state = method.init_state(model, grads)
    for round_idx in range(2):  # two rounds, so folded methods carry a base delta
        uploads = []
        for client_id in range(2):
            upload, _ = train_one(model, method, state, round_idx, cycle(random_batches(client_id)), TrainConfig(local_steps=2, lr=2e-2), client_id)
            uploads.append(Upload(client_id, 8, upload))
        state = method.aggregate(state, uploads, round_idx).state
    method.load_state(model, state)
    batch = random_batches(42, count=1)[0]
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits

    export_peft(base(), state, method.scaling, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got - expected).abs().max()
    # and the adapter does something: without it the logits differ
    with torch.no_grad():
        plain = base()(**batch).logits
    assert not torch.allclose(plain, expected, atol=1e-4)
