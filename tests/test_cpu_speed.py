"""The CPU dropout keeps dropout's law and gradient; fused AdamW keeps AdamW's arithmetic."""

import math

import pytest
import torch

from lisa_demo.cpu_speed import CpuDropout, adamw_options, bernoulli_keep, use_cpu_dropout
from lisa_demo.train.state import load_optimizer, save_optimizer


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_mask_drops_each_element_with_the_asked_probability(p):
    torch.manual_seed(0)
    levels = round(p * 65536)
    keep = bernoulli_keep(torch.Size([1000, 4001]), levels)  # odd size: a partial last word
    n = keep.numel()
    dropped = 1.0 - keep.float().mean().item()
    expected = levels / 65536
    assert abs(dropped - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    # The four 16-bit slices of a word are independent draws, not copies of one another.
    slices = (~keep).flatten()[: n - n % 4].view(-1, 4).float()
    both = (slices[:, 0] * slices[:, 1]).mean().item()
    assert abs(both - expected**2) < 5 * math.sqrt(expected**2 / (n / 4))


def test_dropout_scales_what_it_keeps_and_its_gradient_follows_the_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 50, requires_grad=True)
    layer = CpuDropout(0.25).train()
    out = layer(x)
    keep = out != 0
    scale = 65536 / (65536 - 16384)  # p = 0.25 is exactly 16384 / 65536: scale 4/3
    assert torch.allclose(out[keep], x.detach()[keep] * scale)
    assert 0.2 < 1 - keep.float().mean().item() < 0.3
    weights = torch.randn(64, 50)
    (out * weights).sum().backward()
    assert torch.allclose(x.grad, weights * keep * scale)


def test_dropout_is_the_identity_in_eval_and_reproducible_under_a_seed():
    x = torch.randn(8, 16, 32)
    layer = CpuDropout(0.1)
    assert torch.equal(layer.eval()(x), x)
    layer.train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # a new draw each call
    assert torch.equal(CpuDropout(0.0).train()(x), x)


def test_lora_layers_get_the_cpu_dropout_and_give_the_same_outputs_in_eval():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    config = LoraConfig(r=4, lora_dropout=0.1, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, config)
    x = torch.randn(5, 12)
    before = model.eval()(x)
    assert use_cpu_dropout(model) == 2
    assert use_cpu_dropout(model) == 0  # already swapped
    assert torch.equal(model(x), before)
    model.train()
    model(x).sum().backward()  # trains through the new dropout
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_fused_adamw_on_a_cpu_makes_the_same_updates():
    def run(options):
        generator = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(7, 3), (4,)]]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, **options)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        return params

    options = adamw_options([torch.nn.Parameter(torch.zeros(2))])
    assert options == {"fused": True}
    for fused, plain in zip(run(options), run({}), strict=True):
        assert torch.allclose(fused, plain, atol=1e-6)


def test_resume_keeps_this_process_optimizer_implementation(tmp_path):
    params = [torch.nn.Parameter(torch.ones(3))]
    fused = torch.optim.AdamW(params, lr=0.5, fused=True)
    params[0].grad = torch.ones(3)
    fused.step()
    save_optimizer(fused, tmp_path)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    load_optimizer(plain, tmp_path)
    group = plain.param_groups[0]
    assert group["lr"] == 0.5  # the checkpoint's hyperparameters
    assert not group["fused"]  # this optimizer's implementation
    state = next(iter(plain.state.values()))
    assert torch.equal(state["exp_avg"], next(iter(fused.state.values()))["exp_avg"])
