"""Memory profiles and the low-memory optimizer techniques: bf16 weights with stochastic rounding or Kahan
compensation, and the optimizer step fused into backward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_bits_equal, cuda, final_unet

from dreambooth.config import Machine, resolve
from dreambooth.config.profiles import auto_profile
from dreambooth.errors import UserError
from dreambooth.training.paramwise import ParamwiseOptimizer, join_bf16, split_bf16_, stochastic_round_
from dreambooth.training.trainer import Trainer, run_training

LR = 2e-6  # JumpStart's learning rate: far below bf16's resolution for weights of ordinary size


# --- profiles -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gib, name", [(None, "default"), (79.6, "24gb"), (23.6, "24gb"), (15.7, "default"),
                                       (11.7, "default"), (7.8, "8gb"), (5.8, "6gb")])
def test_auto_profile_by_gpu_memory(gib, name):
    assert auto_profile(gib) == name


def memory(cfg, gib=None, processes=1, bf16=True):
    """The memory plan of `cfg` on a card with `gib` GiB (CPU arithmetic), and the whole run plan."""
    plan = resolve(cfg, Machine(gpu_gib=gib, processes=processes, bf16=bf16), epoch_items=4)
    return plan.memory, plan


def test_profile_fills_only_unset_keys(make_cfg):
    cfg = make_cfg(memory_profile="6gb", with_prior_preservation=True)
    plan, run = memory(cfg)
    assert (run.precision, run.prior_mode) == ("bf16", "concat")
    assert (cfg.mixed_precision, cfg.prior_mode) == ("auto", "concat")  # the config itself is never changed
    assert run.gradient_checkpointing is False  # make_cfg sets it: the user's choice wins
    assert (plan.master_weights, plan.rounding, plan.fused_backward) == ("bf16", "stochastic", True)
    assert plan.backwards_per_step == 1  # joined prior: one backward pass, gradients freed as they come
    seq, _ = memory(make_cfg(memory_profile="6gb", with_prior_preservation=True, prior_mode="sequential"))
    assert seq.backwards_per_step == 2  # asked for: two passes, the first one's gradients held for the second
    plan, _ = memory(make_cfg(memory_profile="8gb", gradient_accumulation_steps=3), processes=2)
    assert plan.rounding == "kahan" and not plan.fused_backward and plan.backwards_per_step == 3


def test_auto_profile_on_a_small_gpu_and_conflicts(make_cfg):
    assert memory(make_cfg(), 7.8)[0].profile == "8gb"
    plan, _ = memory(make_cfg(), 7.8, bf16=False)
    assert plan.profile == "default" and plan.notes
    with pytest.raises(UserError, match="mixed_precision"):
        memory(make_cfg(memory_profile="8gb", mixed_precision="no"))
    with pytest.raises(UserError, match="bf16"):
        memory(make_cfg(memory_profile="6gb"), bf16=False)
    lora, _ = memory(make_cfg(memory_profile="6gb", finetune="lora"))
    assert lora.master_weights == "fp32" and not lora.fused_backward


# --- bf16 write-back ----------------------------------------------------------------------------------------

def test_split_bf16_is_exact_and_rounds_to_nearest():
    x = torch.randn(10_000) * torch.logspace(-6, 2, 10_000)
    hi, lo = torch.empty(x.shape, dtype=torch.bfloat16), torch.empty(x.shape, dtype=torch.int16)
    split_bf16_(hi, lo, x)
    assert torch.equal(join_bf16(hi, lo), x)
    assert ((hi.float() - x).abs() <= (x.bfloat16().float() - x).abs() * 1.0001 + 1e-30).all()


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from bf16's 1 to its next value, 1 + 2^-7
    lo, hi = torch.tensor(1.0), torch.tensor(1.0 + 2**-7)
    out = stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) <= {lo.item(), hi.item()}
    assert out.float().mean().item() == pytest.approx(x[0].item(), abs=2e-5)  # nearest would give 1.0 always
    negative = stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), -x, torch.Generator().manual_seed(1))
    assert negative.float().mean().item() == pytest.approx(-x[0].item(), abs=2e-5)


def _regression(kind: str, steps: int = 200, n: int = 128):
    """AdamW at lr 2e-6 on least squares (n x n weights of size ~0.3); returns (loss per step, fp32 weights)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, n, generator=g)
    y = x @ (torch.randn(n, n, generator=g) * 0.3)
    w0 = (torch.randn(n, n, generator=g) * 0.3).bfloat16()  # bf16 values, so every run starts identical
    w = torch.nn.Parameter(w0.float() if kind == "fp32" else w0.clone())
    if kind in ("fp32", "plain-bf16"):
        opt = torch.optim.AdamW([w], lr=LR, weight_decay=0.01)
    else:
        opt = ParamwiseOptimizer([w], lr=LR, weight_decay=0.01, rounding=kind, seed=0)
    losses = []
    for step in range(steps + 1):
        loss = ((x @ w.float() - y) ** 2).mean()
        losses.append(loss.item())
        if step == steps:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    master = opt.master_weight(w) if isinstance(opt, ParamwiseOptimizer) else w.detach().float()
    return torch.tensor(losses, dtype=torch.float64), master - w0.float()


def test_bf16_adamw_at_2e6_needs_stochastic_rounding_or_kahan():
    """Tolerances: stochastic rounding's loss decrease within 10% of fp32 AdamW's at every step from 50 to 200
    (3% at step 200); Kahan's fp32 weights move within 5% (relative L2) of fp32 AdamW's; plain bf16 AdamW keeps
    under 2% of the decrease, because a 2e-6 update is below half a bf16 step (2^-9 at 0.3) and rounds away."""
    ref_losses, ref_move = _regression("fp32")
    ref_drop = ref_losses[0] - ref_losses
    assert ref_drop[-1] > 0

    sr_losses, _ = _regression("stochastic")
    sr_drop = sr_losses[0] - sr_losses
    assert ((sr_drop - ref_drop).abs()[50:] / ref_drop[50:]).max() < 0.10
    assert sr_drop[-1] / ref_drop[-1] == pytest.approx(1.0, abs=0.03)

    _, kahan_move = _regression("kahan")
    assert (kahan_move - ref_move).norm() / ref_move.norm() < 0.05

    plain_losses, plain_move = _regression("plain-bf16")
    assert (plain_losses[0] - plain_losses[-1]) / ref_drop[-1] < 0.02
    assert (plain_move != 0).float().mean() < 0.01  # only weights near zero, where bf16 is fine, moved at all


# --- fused backward -----------------------------------------------------------------------------------------

def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dtype)


def _wide(dtype=torch.float32):
    """Like _mlp, with a first weight of 8,192 values: bitsandbytes keeps 8-bit states only from 4,096 up."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 4)).to(dtype)


def _train(model, opt, passes: int, steps: int = 3, fused: bool = False):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(passes):  # gradient accumulation (or instance + prior passes)
            x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)  # the same draws on any device
            p = next(model.parameters())
            ((model(x.to(p.device, p.dtype)).float() - y.to(p.device)) ** 2).mean().backward()
        if fused:
            opt.close_step()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype, rounding", [(torch.float32, None), (torch.bfloat16, "kahan")])
@pytest.mark.parametrize("passes", [1, 2])
def test_fused_backward_equals_the_separate_step(dtype, rounding, passes):
    a, b = _mlp(dtype), _mlp(dtype)
    separate = ParamwiseOptimizer(a.parameters(), lr=1e-2, weight_decay=0.01, rounding=rounding)
    fused = ParamwiseOptimizer(b.parameters(), lr=1e-2, weight_decay=0.01, rounding=rounding)
    fused.fuse_into_backward(backwards_per_step=passes)
    assert_bits_equal(_train(a, separate, passes), _train(b, fused, passes, fused=True))
    if dtype == torch.float32:  # and the per-tensor steps are torch's AdamW
        c = _mlp()
        reference = _train(c, torch.optim.AdamW(c.parameters(), lr=1e-2, weight_decay=0.01), passes)
        for x, y in zip(reference, a.parameters()):
            torch.testing.assert_close(x, y.detach(), rtol=1e-6, atol=1e-7)


def test_fused_backward_frees_gradients_and_clips_by_the_last_norm():
    model = _mlp()
    opt = ParamwiseOptimizer(model.parameters(), lr=1e-2)
    opt.fuse_into_backward(max_grad_norm=1e-3)
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 8), torch.randn(5, 4)
    ((reference(x) - y) ** 2).mean().backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    ((model(x) - y) ** 2).mean().backward()
    assert all(p.grad is None for p in model.parameters())  # each gradient freed as soon as it was used
    assert opt.close_step() == pytest.approx(true_norm, rel=1e-5)
    assert opt._clip_coef.item() == pytest.approx(1e-3 / true_norm, rel=1e-4)


def test_paramwise_state_dict_resumes_exactly():
    whole, half = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    opt = ParamwiseOptimizer(whole.parameters(), lr=1e-2, rounding="kahan")
    expected = _train(whole, opt, 1, steps=4)
    opt2 = ParamwiseOptimizer(half.parameters(), lr=1e-2, rounding="kahan")
    _train(half, opt2, 1, steps=2)
    state, weights = copy.deepcopy(opt2.state_dict()), copy.deepcopy(half.state_dict())
    resumed = _mlp(torch.bfloat16)
    resumed.load_state_dict(weights)
    opt3 = ParamwiseOptimizer(resumed.parameters(), lr=1e-2, rounding="kahan")
    opt3.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the two steps the first run already took: same data stream position
        torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
    for _ in range(2):
        x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
        ((resumed(x.bfloat16()).float() - y) ** 2).mean().backward()
        opt3.step()
        opt3.zero_grad()
    assert_bits_equal(expected, list(resumed.parameters()))


def test_8bit_inner_optimizer_is_bitsandbytes():
    """bitsandbytes (0.50+) runs its 8-bit AdamW on CPU too, so the per-tensor plumbing is tested for real."""
    bnb = pytest.importorskip("bitsandbytes")
    model = _wide(torch.bfloat16)
    opt = ParamwiseOptimizer(model.parameters(), lr=1e-2, inner="adamw8bit", rounding="stochastic")
    opt.fuse_into_backward()
    inner = list(opt._inner.values())
    assert len(inner) == 4 and all(isinstance(o, bnb.optim.AdamW8bit) for o in inner)
    assert inner[0].param_groups[0]["lr"] == 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, steps=1, fused=True)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert next(iter(inner[0].state.values()))["state1"].dtype == torch.uint8  # really 8-bit states


def test_8bit_adamw_skips_the_per_tensor_device_waits(monkeypatch):
    """Same updates as bitsandbytes' own AdamW8bit, bit for bit, without its wait for the device after each tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.optim import optimizer as bnb_optimizer

    from dreambooth.training.adamw import adamw8bit
    waits = []

    def wait(tensor):
        waits.append(tensor)
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", wait)
    ours, theirs = _wide(), _wide()
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_ours, opt_theirs = adamw8bit(ours.parameters(), **hp), bnb.optim.AdamW8bit(theirs.parameters(), **hp)
    for step in range(3):
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            (model(x) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert len(waits) == 3 * 4  # bitsandbytes' own step: one wait per tensor, every step; ours none
    assert bnb_optimizer.sync_gpu is wait  # ours put bitsandbytes' function back after each step
    assert opt_ours.state[ours[0].weight]["state1"].dtype == torch.uint8  # the 8-bit kernels ran
    assert_bits_equal(list(ours.parameters()), list(theirs.parameters()))


def test_discard_step_forgets_a_half_accumulated_step():
    model, fresh = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    opt = ParamwiseOptimizer(model.parameters(), lr=1e-2, weight_decay=0.01, rounding="kahan")
    opt.fuse_into_backward(backwards_per_step=2)
    ((model(torch.randn(5, 8).bfloat16()).float()) ** 2).mean().backward()  # the first of two passes
    assert all(p.grad is not None for p in model.parameters()) and opt._counts
    opt.discard_step()
    assert all(p.grad is None for p in model.parameters()) and not opt._counts
    # Nothing of the dropped pass is left: the next step is a fresh optimizer's first, bit for bit.
    reference = ParamwiseOptimizer(fresh.parameters(), lr=1e-2, weight_decay=0.01, rounding="kahan")
    reference.fuse_into_backward(backwards_per_step=2)
    assert_bits_equal(_train(model, opt, 2, steps=1, fused=True), _train(fresh, reference, 2, steps=1, fused=True))
    assert_bits_equal(opt.state_dict(), reference.state_dict())
    for _ in range(2):  # the step's last pass steps every tensor: too late to discard
        ((model(torch.randn(5, 8).bfloat16()).float()) ** 2).mean().backward()
    with pytest.raises(RuntimeError, match="discard_step"):
        opt.discard_step()


def fused_torch_adamw(monkeypatch, fused_kernel: bool = True) -> None:
    """Make ParamwiseOptimizer's per-tensor AdamW torch's fused kernel (its CUDA choice) or the plain one."""
    import dreambooth.training.paramwise
    monkeypatch.setattr(dreambooth.training.paramwise, "adamw",
                        lambda params, name, **kw: torch.optim.AdamW(params, fused=fused_kernel, **kw))


def test_skip_flag_leaves_fused_adamw_updates_as_they_were(monkeypatch):
    """With finite gradients, the fused backward (which hands torch's fused AdamW a 0.0 skip flag) still equals
    the separate step (no flag), bit for bit."""
    fused_torch_adamw(monkeypatch)
    a, b = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    separate = ParamwiseOptimizer(a.parameters(), lr=1e-2, weight_decay=0.01, rounding="kahan")
    fused = ParamwiseOptimizer(b.parameters(), lr=1e-2, weight_decay=0.01, rounding="kahan")
    fused.fuse_into_backward(backwards_per_step=2)
    assert_bits_equal(_train(a, separate, 2), _train(b, fused, 2, fused=True))
    assert_bits_equal(separate.state_dict()["state"], fused.state_dict()["state"])


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
@pytest.mark.parametrize("fused_kernel", [True, False])
def test_overflowed_gradient_skips_its_tensor_under_torchs_fused_adamw(monkeypatch, rounding, fused_kernel):
    """Torch's fused AdamW (ours without bitsandbytes) skips a tensor whose gradient is not finite, on the device.
    Other inner optimizers step the zeroed gradient: the weight stays finite."""
    fused_torch_adamw(monkeypatch, fused_kernel)
    model = _mlp(torch.bfloat16)
    opt = ParamwiseOptimizer(model.parameters(), lr=1e-2, weight_decay=0.1, rounding=rounding)
    opt.fuse_into_backward()
    _train(model, opt, 1, steps=1, fused=True)  # moments, step counts and Kahan buffers exist
    bad = model[2].bias
    bad.register_hook(lambda g: g / 0.0)  # +-inf, or NaN where the gradient is 0
    weights, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    ((model(torch.randn(5, 8).bfloat16()).float() - torch.randn(5, 4)) ** 2).mean().backward()
    assert not math.isfinite(opt.close_step())
    assert all(not torch.equal(w, p) for w, p in list(zip(weights, model.parameters()))[:3])  # the others stepped
    if fused_kernel:
        assert torch.equal(weights[3], bad.detach())
        assert_bits_equal(opt.state_dict()["state"][3], state[3])
    else:
        assert torch.isfinite(bad).all()


# --- the trainer ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["6gb", "8gb"])
def test_low_memory_profiles_train_and_export_fp32(make_cfg, profile):
    trainer = Trainer(make_cfg(memory_profile=profile, max_steps=2, learning_rate=1e-3)).setup()
    assert trainer.step.paramwise is not None and trainer.step.paramwise.fused
    assert all(p.dtype == torch.bfloat16 for p in trainer.step.params)
    before = [p.detach().clone() for p in trainer.step.params]
    summary = trainer.train()
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(trainer.state.losses)).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.step.params))
    unet = trainer.pipeline().unet
    assert all(p.dtype == torch.float32 for p in unet.parameters())


def test_fused_step_with_sequential_prior_steps_once_per_step(make_cfg):
    cfg = make_cfg(memory_profile="6gb", with_prior_preservation=True, num_class_images=2, class_sampling_steps=2,
                   sample_batch_size=2, max_steps=1, prior_mode="sequential")
    trainer = Trainer(cfg).setup()
    assert trainer.step.paramwise.backwards_per_step == 2
    logs = trainer.step.run(trainer.batches(), trainer.state)
    assert {"prior_loss", "instance_loss"} <= set(logs) and logs["grad_norm"] > 0
    steps = {int(s["step"]) for s in (o.state_dict()["state"].get(0, {}) for o in trainer.step.paramwise._inner.values())
             if "step" in s}
    assert steps == {1}  # every tensor stepped exactly once, after the second (prior) backward pass


@pytest.mark.parametrize("profile", ["6gb", "8gb"])
def test_low_memory_profiles_resume_exactly(make_cfg, tmp_path, profile):
    extra = dict(memory_profile=profile, center_crop=False, random_flip=True, learning_rate=1e-3)
    run_training(make_cfg(output_dir=str(tmp_path / "straight"), max_steps=4, **extra))
    run_training(make_cfg(output_dir=str(tmp_path / "split"), max_steps=2, checkpoint_steps=2, **extra))
    # Only max_steps differs, and the constant schedule does not depend on it.
    run_training(make_cfg(output_dir=str(tmp_path / "split"), max_steps=4, resume="latest", resume_force=True,
                          **extra))
    assert_bits_equal(final_unet(tmp_path / "straight"), final_unet(tmp_path / "split"))


@cuda
@pytest.mark.gpu
def test_bf16_paramwise_adamw_on_cuda_matches_cpu():
    a, b = _mlp(torch.bfloat16), _mlp(torch.bfloat16).cuda()
    cpu = _train(a, ParamwiseOptimizer(a.parameters(), lr=1e-2, rounding="kahan"), 1)
    gpu = _train(b, ParamwiseOptimizer(b.parameters(), lr=1e-2, rounding="kahan"), 1)
    for x, y in zip(cpu, gpu):
        torch.testing.assert_close(x, y.cpu(), rtol=2e-2, atol=2e-3)


@cuda
@pytest.mark.gpu
def test_8bit_paramwise_fused_on_cuda():
    pytest.importorskip("bitsandbytes")
    model = torch.nn.Linear(256, 256).cuda().to(torch.bfloat16)  # > 4096 elements: 8-bit states
    opt = ParamwiseOptimizer(model.parameters(), lr=1e-3, inner="adamw8bit", rounding="stochastic")
    opt.fuse_into_backward()
    before = model.weight.detach().clone()
    model(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.close_step()
    assert not torch.equal(before, model.weight) and model.weight.grad is None
    def tensors(node):  # bitsandbytes nests its quantised state differently across versions
        if isinstance(node, dict):
            return [t for v in node.values() for t in tensors(v)]
        return [node] if torch.is_tensor(node) else []
    assert any(t.dtype == torch.uint8 for t in tensors(opt.state_dict()["state"][0]))  # 8-bit moments


@cuda
@pytest.mark.gpu
def test_8bit_adamw_on_cuda_equals_bitsandbytes_without_waiting(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from dreambooth.training.adamw import adamw8bit
    ours, theirs = _wide().cuda(), _wide().cuda()
    opt_ours, opt_theirs = adamw8bit(ours.parameters(), lr=1e-2), bnb.optim.AdamW8bit(theirs.parameters(), lr=1e-2)
    waits = []
    synchronize = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (waits.append(1), synchronize(*a)))
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        before = len(waits)
        for step in range(3):
            x = torch.randn(64, 8, generator=torch.Generator().manual_seed(step)).cuda()
            (model(x) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        counted = len(waits) - before
    assert counted == 3 * 4  # bitsandbytes' own: a wait per tensor per step
    assert len(waits) == counted  # ours: none
    assert opt_ours.state[ours[0].weight]["state1"].dtype == torch.uint8
    assert_bits_equal(list(ours.parameters()), list(theirs.parameters()))


def test_adamw_first_step_ignores_the_gradient_scale():
    """Why the fused backward may leave its first step unclipped: AdamW's first update does not depend on it."""
    def first_step(scale):
        model = _mlp()
        opt = ParamwiseOptimizer(model.parameters(), lr=1e-2)
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        (model(x) ** 2).mean().mul(scale).backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]
    start = [p.detach().clone() for p in _mlp().parameters()]
    for a, b, before in zip(first_step(1.0), first_step(0.1), start):  # a clip to a tenth of the norm: the same step
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * 1e-2)  # within 1% of the 1e-2 update
        assert (a - before).abs().max() > 5e-3  # and the step did move the weights by about the 1e-2 rate
