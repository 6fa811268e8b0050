"""The optimisation loop every method runs: micro-batches in a fixed order, gradient
accumulation, clipping, the lr schedule, the loss log, saves and the progress bar."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .common import step_generator
from .dataset import BatchLoader
from .losslog import LossLog


def _loader(data, batches, inputs, num_workers):
    return torch.utils.data.DataLoader(BatchLoader(data, batches, inputs), batch_size=None,
                                       shuffle=False, num_workers=num_workers)


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
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        mean = acc.reduce(total / accumulation, reduction="mean").item()
        log.append(step + 1, mean, lr)
        bar.update(1)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}")
        if step + 1 in save_steps:
            save_model(step + 1)
            run.save_state(step + 1, log.rows)
            log.draw()
    bar.close()
    return log.rows


__all__ = ["train_loop"]
