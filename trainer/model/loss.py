"""The language-model head, whose training loss never holds the whole micro batch's logits.

Given targets, `LMHead` computes the mean cross-entropy (float32, -1 marks positions without a
target) a chunk of tokens at a time: each chunk's logits, their loss, and at once their gradients
with respect to the hidden states and the head's weight, after which the chunk's logits are freed.
Backward then only scales the stashed gradients (the loss is its graph's last node, so its incoming
gradient is a scalar). Peak memory is one chunk's logits instead of the micro batch's logits and
their float32 softmax and gradients, and no matmul is recomputed. The loss runs inside the head's
own forward so ZeRO-3 has gathered the weight (tied to the token embedding) when it is read.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from trainer.model.experts import in_compute_dtype


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d)^T against targets (N,), chunk rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        count = (targets != -1).sum()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Float32 so the chunks' partial sums add without rounding to the weight's 16 bits each time.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):  # the caller cast to autocast's dtype
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk], targets[start:start + chunk]
                logits = F.linear(h, weight).float()
                valid = t != -1
                index = t.clamp(min=0)[:, None]
                lse = torch.logsumexp(logits, dim=1)
                total += ((lse - logits.gather(1, index).squeeze(1)) * valid).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d(mean loss)/d(logits) = (softmax - one-hot) / count on rows with a target, 0 elsewhere.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, index, -valid[:, None].float())
                grad = grad.mul_((valid / count.clamp(min=1))[:, None]).to(hidden.dtype)  # none: 0, as F.cross_entropy
                if grad_hidden is not None:
                    torch.mm(grad, weight, out=grad_hidden[start:start + chunk])
                if grad_weight is not None:
                    grad_weight += torch.mm(grad.t(), h)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


class LMHead(nn.Linear):
    """The output projection to the vocabulary (no bias); forward(x, targets) returns the mean
    cross-entropy over `chunk_tokens` tokens at a time instead of the logits."""

    def __init__(self, d_model: int, vocab_size: int, chunk_tokens: int):
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk_tokens = chunk_tokens

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        x, weight = in_compute_dtype(self.weight, like=x)
        return ChunkedCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), self.chunk_tokens)
