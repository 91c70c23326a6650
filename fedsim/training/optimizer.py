"""AdamW over tensors whose first dimension is the client, and gradient clipping by each client's own norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StackedAdamW:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) over tensors whose first dimension is the client.

    AdamW is elementwise, so slice k follows exactly the AdamW client k would run alone. Where every client
    has the same learning rate and weight decay at a step (one schedule for all), the step is torch's own
    AdamW (``torch.optim.adamw.adamw``, the function ``torch.optim.AdamW`` calls: its multi-tensor kernels on
    a GPU); where they differ (clients whose schedules run over different numbers of steps), the same
    arithmetic is applied with a learning rate per slice. Betas (0.9, 0.999) and eps 1e-8: torch's defaults,
    which ``train_local`` uses.
    """

    def __init__(self, params: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.betas, self.eps = betas, eps
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.state_steps = [torch.tensor(0.0) for _ in params]  # as torch.optim.AdamW keeps them

    @torch.no_grad()
    def step(self, lr: Sequence[float], weight_decay: Sequence[float]) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        exp_avgs, exp_avg_sqs = [self.exp_avg[i] for i in live], [self.exp_avg_sq[i] for i in live]
        steps = [self.state_steps[i] for i in live]
        beta1, beta2 = self.betas
        if len(set(lr)) == 1 and len(set(weight_decay)) == 1:
            from torch.optim.adamw import adamw

            adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=lr[0], weight_decay=weight_decay[0], eps=self.eps, maximize=False)
            return
        for param, exp_avg, exp_avg_sq, step_t in zip(params, exp_avgs, exp_avg_sqs, steps):
            step_t += 1
            step = step_t.item()
            shape = (len(lr),) + (1,) * (param.dim() - 1)
            dtype = torch.promote_types(param.dtype, torch.float32)
            lr_t = torch.tensor(lr, dtype=dtype).reshape(shape).to(param.device)
            decay_t = torch.tensor(weight_decay, dtype=dtype).reshape(shape).to(param.device)
            param.mul_(1 - lr_t * decay_t)
            exp_avg.lerp_(param.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            param.add_(exp_avg / denom * (-lr_t / (1 - beta1**step)))

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None


def clip_per_client(trained: Sequence[torch.Tensor], max_norms: Sequence[float | None]) -> None:
    """``clip_grad_norm_`` on each client's slice of ``trained`` by its own norm (2-norm over all its tensors)."""
    grads = [t.grad for t in trained if t.grad is not None]
    if not grads or all(m is None for m in max_norms):
        return
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1) for g in grads])
    norms = torch.linalg.vector_norm(per_tensor, dim=0)  # (K,)
    limits = torch.tensor([float("inf") if m is None else m for m in max_norms], dtype=norms.dtype, device=norms.device)
    coef = torch.clamp(limits / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.reshape(-1, *[1] * (g.dim() - 1)).to(g.dtype))


