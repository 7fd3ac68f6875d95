"""The training step as TorchRec's sparse-dist train pipeline, with DeepSpeed's dense step.

TrainPipelineSparseDist keeps up to three batches in flight: while batch i runs forward, backward and
both optimizer steps, batch i+1's input distribution (the splits, then the lengths and values
all-to-alls of every sharded collection, the splits of all collections fused into one collective) is
under way, and batch i+2 is read. Only the lookups' output distribution stays on the critical path.
The pipeline reaches the sharded collections by tracing the model: each takes an attribute of the batch
(Batch.features) as it is, and the model's other modules are leaves of the trace.

TorchRec's loop is kept as it is; this subclass only swaps what differs in this trainer: the forward,
the backward and the optimizer step are the trainer's own (the same ones its plain loop runs: the
loss checked, backward through the DeepSpeed engine, DeepSpeed's step then the fused table optimizer's),
and the batch's copy and input distribution run under the trainer's phase timer ('input_dist' is the
pipeline's own phase).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from lcron_dist.components.profiling import PhaseTimer
from lcron_dist.data.batch import Batch

StepOutput = tuple[dict[str, torch.Tensor], int]
"""A training step's detached loss parts ({'loss': total, **parts}) and its batch's request count."""


class SparseDistPipeline(TrainPipelineSparseDist):
    """TorchRec's TrainPipelineSparseDist driving a sharded Cascade through the trainer's step.

    Args:
        model: the DistributedModelParallel-sharded Cascade.
        sparse_optimizer: the fused table optimizer (its zero_grad starts each step).
        device: the training device.
        timer: the trainer's phase timer.
        forward: batch -> (loss, detached loss parts {'loss': total, **parts}).
        backward: runs the loss backward.
        optimizer_step: steps every optimizer.
    """

    def __init__(self, model: torch.nn.Module, sparse_optimizer: torch.optim.Optimizer, device: torch.device,
                 timer: PhaseTimer, forward: Callable[[Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 backward: Callable[[torch.Tensor], None], optimizer_step: Callable[[], None]) -> None:
        super().__init__(model, sparse_optimizer, device, execute_all_batches=True, custom_model_fwd=self._forward)
        self.timer = timer
        self.forward, self.backward, self.optimizer_step = forward, backward, optimizer_step

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        loss, parts = self.forward(batch)
        return loss, (parts, batch.size)

    def _backward(self, losses: torch.Tensor) -> None:
        self.backward(losses)

    def _optimizer_step(self) -> None:
        self.optimizer_step()

    def copy_batch_to_gpu(self, dataloader_iter: Iterator[Batch]):
        with self.timer.phase("data"):
            return super().copy_batch_to_gpu(dataloader_iter)

    def start_sparse_data_dist(self, batch: Batch | None, context) -> None:
        with self.timer.phase("input_dist"):
            super().start_sparse_data_dist(batch, context)

    def wait_sparse_data_dist(self, context) -> None:
        with self.timer.phase("input_dist"):
            super().wait_sparse_data_dist(context)

    def steps(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """Train on every batch of `batches`, in order; yields each step's output once it is done.

        Batches i+1 and i+2 are taken from `batches` while step i runs; the last ones are trained when
        `batches` ends (none is dropped). The model's sharded collections run pipelined only in here:
        after the last step (or an error) they get their own forward back, so evaluation, export and
        checkpoints see the plain model, and the next call traces it again (milliseconds).
        """
        self.attach()
        try:
            while True:
                try:
                    yield self.progress(batches)
                except StopIteration:
                    return
        finally:
            self.reset()  # nothing in flight survives a call (after an error: batches that never trained)
            self.detach()
