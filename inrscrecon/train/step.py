"""One optimizer step with no host synchronisation: sample → gather → forward → loss → backward → Adam, with the
loss parts accumulated on the device (read once per epoch by the loop).

Two forms with one contract (``step(*batch_args)``; parts added to ``acc`` [P] float64 in ``PARTS`` order):

* eager — ``torch.optim.Adam.step`` with the learning rate set from the host's step counter (a Python float:
  no device read). Bit-for-bit the step the loop always ran.
* compiled — the whole step traced as ONE graph by ``torch.compile(fullgraph=True)``: autograd is traced
  (``trace_autograd_ops``) and the update is the functional Adam on the optimizer's own state tensors with
  the learning rate computed from Adam's step tensor on the device (``torch.optim.Adam.step`` itself forces
  graph breaks). On CUDA the graph can also be captured as a CUDA graph (``mode="reduce-overhead"``).
  A graph break is an error here, so "it compiles" means "it never waits for the host".

The learning-rate schedule is cosine from ``lr`` to ``min_lr_ratio · lr`` over ``total`` steps; the factor of
step k (0-based, before the update) is :func:`lr_factor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch.optim.adam import adam as adam_update

log = logging.getLogger(__name__)


def lr_factor(step: int, total: int, min_lr_ratio: float) -> float:
    """Cosine factor of optimizer step ``step`` of ``total``: 1 → ``min_lr_ratio``."""
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def _lr_factor_tensor(step: torch.Tensor, total: int, min_lr_ratio: float) -> torch.Tensor:
    frac = torch.clamp(step.double() / max(total, 1), max=1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + torch.cos(math.pi * frac))


def init_adam_state(opt: torch.optim.Adam) -> None:
    """Create Adam's per-parameter state (as its first ``step`` would) so that a traced step finds it."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state and opt.state[p]:
                continue
            on_device = group.get("capturable") or group.get("fused")
            opt.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


class TrainStep:
    """A callable optimizer step (module docstring).

    ``loss_fn(*args)`` → (loss scalar with grad, parts [P] detached); ``acc`` [P] float64 on the device receives
    the parts; ``host_step`` is the number of steps done before this one (eager learning rate).
    ``compile_backend``: torch.compile's backend (``aot_eager`` traces the same single graph without code
    generation: what the tests use to prove there is no graph break in seconds). ``strict=False`` (what
    ``fit`` uses): when tracing or code generation fails on the first call, say so once and run eager.
    """

    def __init__(
        self,
        loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        opt: torch.optim.Adam,
        lr: float,
        total: int,
        min_lr_ratio: float,
        compile: bool = False,
        cuda_graphs: bool = False,
        compile_backend: str = "inductor",
        strict: bool = True,
    ):
        self.loss_fn = loss_fn
        self.strict = strict
        self._first = True
        self.opt = opt
        self.lr = lr
        self.total = total
        self.min_lr_ratio = min_lr_ratio
        self.compiled = compile
        self._params: Sequence[torch.Tensor] = [p for g in opt.param_groups for p in g["params"]]
        self._fn: Callable[..., Any]
        if compile:
            init_adam_state(opt)
            mode = "reduce-overhead" if cuda_graphs else None
            self._fn = torch.compile(self._traced, fullgraph=True, mode=mode, backend=compile_backend)
        else:
            self._fn = self._eager

    def _eager(self, acc: torch.Tensor, host_step: int, *args: Any) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr * lr_factor(host_step, self.total, self.min_lr_ratio)
        loss, parts = self.loss_fn(*args)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        acc.add_(parts.double())

    def _traced(self, acc: torch.Tensor, *args: Any) -> None:
        loss, parts = self.loss_fn(*args)
        loss.backward()
        group = self.opt.param_groups[0]
        params = [p for p in self._params if p.grad is not None]
        state = [self.opt.state[p] for p in params]
        with torch.no_grad():
            factor = _lr_factor_tensor(state[0]["step"], self.total, self.min_lr_ratio)
            beta1, beta2 = group["betas"]
            adam_update(
                params,
                [cast(torch.Tensor, p.grad) for p in params],
                [s["exp_avg"] for s in state],
                [s["exp_avg_sq"] for s in state],
                [],
                [s["step"] for s in state],
                foreach=group.get("foreach"),
                capturable=bool(group.get("capturable")),
                differentiable=False,
                fused=None,
                grad_scale=None,
                found_inf=None,
                has_complex=False,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=(self.lr * factor).float(),
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        for p in params:
            p.grad = None
        acc.add_(parts.double())

    def __call__(self, acc: torch.Tensor, host_step: int, *args: Any) -> None:
        if self.compiled:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                try:
                    self._fn(acc, *args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # tracing / code generation failed before the step ran
                    if self.strict or not self._first:
                        raise
                    log.warning(
                        "compiled train step unavailable (%s: %s); running it eager",
                        type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "",
                    )
                    self.compiled, self._fn = False, self._eager
                    self._first = False
                    return self(acc, host_step, *args)
            self._first = False
            for g in self.opt.param_groups:  # the state_dict shows the rate of the next step
                g["lr"] = self.lr * lr_factor(host_step + 1, self.total, self.min_lr_ratio)
        else:
            self._fn(acc, host_step, *args)
