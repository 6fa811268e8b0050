"""The optimisation loop every method runs: micro-batches in a fixed order, gradient
accumulation, clipping, the lr schedule, the loss log, saves and the progress bar.

A run that diverges stops with an SdfastError: at the first step whose loss is not finite (the
step is logged, the model is not saved), and at a save whose trained weights are not (nothing is
saved). The files of earlier saves stay, so the run can resume from its last good state."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..errors import SdfastError
from .common import step_generator
from .dataset import BatchLoader
from .losslog import LossLog


def _loader(data, batches, inputs, num_workers):
    return torch.utils.data.DataLoader(BatchLoader(data, batches, inputs), batch_size=None,
                                       shuffle=False, num_workers=num_workers)


def _all_finite(params):
    """Whether every trained tensor is free of nan and inf (one device sync)."""
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())


def train_loop(run, model, optimizer, scheduler, micro_loss, data, *, seed, accumulation,
               params, save_model, max_grad_norm=1.0, inputs=("pixels",), num_workers=0,
               progress=True):
    """Train from `run.start_step` to `run.max_steps`; returns the loss log rows.

    `micro_loss(micro_batch, inputs, generator)` -> scalar loss of one micro-batch; `inputs` is
    `{name: tensor}` for the names in `inputs` ("pixels", "hints": see `dataset.BatchLoader`),
    `generator` the micro-batch's own CPU generator. `save_model(step)` writes the model at each
    save step, before the training state.
    """
    acc = run.accelerator
    rank, world = acc.process_index, acc.num_processes
    start, end = run.start_step, run.max_steps
    batches = data.micro_batches(seed, start * accumulation, (end - start) * accumulation,
                                 rank, world)
    log = LossLog(run.output_dir, run.loss_rows, write=acc.is_main_process)
    save_steps = set(run.save_steps())
    bar = tqdm(total=end, initial=start, disable=not (progress and acc.is_main_process),
               desc="train", dynamic_ncols=True)
    stream = iter(_loader(data, batches, inputs, num_workers))
    for step in range(start, end):
        total = torch.zeros((), device=acc.device)
        for micro in range(accumulation):
            index, tensors = next(stream)
            generator = step_generator(seed, step, micro * world + rank)
            with acc.accumulate(model):
                loss = micro_loss(batches[index], tensors, generator)
                acc.backward(loss)
                if acc.sync_gradients and max_grad_norm:
                    acc.clip_grad_norm_(params, max_grad_norm)
                try:
                    optimizer.step()
                except RuntimeError as exc:     # lr * (1 / bias correction) past float32
                    if "overflow" not in str(exc):
                        raise
                    bar.close()
                    raise SdfastError(f"training diverged: the optimizer's update at step "
                                      f"{step + 1} overflows ({exc}; lower the learning "
                                      "rate?)") from None
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        mean = acc.reduce(total / accumulation, reduction="mean").item()
        log.append(step + 1, mean, lr)
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}")
        if not math.isfinite(mean):
            bar.close()
            log.draw()
            raise SdfastError(f"training diverged: the loss is {mean} at step {step + 1} "
                              "(lower the learning rate?)")
        if step + 1 in save_steps:
            if not _all_finite(params):
                bar.close()
                raise SdfastError(f"training diverged: the trained weights are not finite after "
                                  f"step {step + 1} (not saved; lower the learning rate?)")
            save_model(step + 1)
            run.save_state(step + 1, log.rows)
            log.draw()
    bar.close()
    return log.rows


__all__ = ["train_loop"]
