"""The next-token baselines of `rpt train` (`--objective ntp | shaped-ntp`), at the same compute
accounting as RPT (6·N FLOPs per trained token), so the three are compared at equal compute.

    ntp         cross-entropy on every token of the training documents (`--ntp-positions all`, the
                windows of `rpttrain.data.DocWindows`) or on the task positions only (`tasks`)
    shaped-ntp  the reward-shaped next-token loss of arXiv 2512.22955 (`objectives.algos.shaped_ntp_loss`)

No rollout engine is built: these objectives never sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from rpttrain.batching import last_positions_logits, left_pad, plan_batches
from rpttrain.data import target_token
from rpttrain.objectives import Objective, ObjectiveParts, algos
from rpttrain.precision import Precision
from rpttrain.prompts import build_prompt_ids, load_prompt_format
from rpttrain.step_record import StepResult


class NextTokenObjective(Objective):
    """One step of next-token training (cross-entropy, or the shaped objective), by micro-batch."""

    progress_keys = ("loss", "accuracy")

    def __init__(
        self,
        config,
        model,
        tokenizer,
        sampler,
        precision: Precision,
        optimizer_step: Callable,
    ):
        self.config = config
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.precision, self.optimizer_step = precision, optimizer_step

    @classmethod
    def build(cls, config, parts: ObjectiveParts) -> NextTokenObjective:
        return cls(config, parts.model, parts.tokenizer, parts.sampler, parts.precision, parts.optimizer_step)

    def examples(self, batch_size: int) -> list[tuple[list[int], int]]:
        """(token ids, number of trailing positions to train) for one batch."""
        c = self.config
        items = self.sampler.take(batch_size)
        if c.ntp_positions == "all":
            return [(chunk.tolist(), len(chunk) - 1) for chunk in items]
        fmt = load_prompt_format("continuation")
        out = []
        for t in items:
            ids = build_prompt_ids(fmt, t["context"], self.tokenizer, c.max_prompt_tokens - 1)
            out.append((ids + [target_token(t, self.tokenizer, exact=not c.allow_tokenizer_mismatch)], 1))
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.objective == "ntp":
            return algos.shaped_ntp_loss(logits, targets)  # beta 0, lambdas 0: cross-entropy
        return algos.shaped_ntp_loss(logits, targets, c.beta, c.topk, c.lambda_top, c.lambda_tail)

    def step(self, step: int, batch_size: int | None = None) -> StepResult:
        c = self.config
        t0 = time.time()
        examples = self.examples(batch_size or c.batch_size)
        total_positions = sum(n for _, n in examples)
        loss_sum = correct = ent_sum = 0.0
        tokens = 0
        for mb in plan_batches([len(seq) for seq, _ in examples], max_tokens=c.micro_batch_tokens):
            batch = [examples[i] for i in mb]
            seqs = [seq for seq, _ in batch]
            width = max(len(s) for s in seqs)
            keep = max(n for _, n in batch)  # trained positions are each sequence's last ones
            with self.precision.autocast():  # the loss upcasts the logits to float32
                logits = last_positions_logits(self.model, seqs, k=keep + 1)[
                    :, :-1
                ]  # column j predicts token width-keep+j
            targets = left_pad(seqs)[0][:, width - keep :]
            mask = torch.zeros(len(batch), keep, dtype=torch.bool)
            for i, (_, n) in enumerate(batch):
                mask[i, keep - n :] = True
            dev = logits.device
            mask, targets = mask.to(dev), targets.to(dev)
            sel_logits, sel_targets = logits[mask], targets[mask]
            loss = self.loss(sel_logits, sel_targets).sum() / total_positions
            loss.backward()
            with torch.no_grad():
                loss_sum += float(loss)
                correct += float((sel_logits.argmax(-1) == sel_targets).sum())
                ent_sum += float(algos.entropy_of_logits(sel_logits).sum())
            tokens += sum(len(s) for s in seqs)
        update_s = time.time() - t0
        grad_norm, bad = self.optimizer_step(loss_sum)
        metrics = {
            "loss": loss_sum,
            "accuracy": correct / max(total_positions, 1),
            "entropy_mean": ent_sum / max(total_positions, 1),
            "positions": total_positions,
            "update_tokens": tokens,
            "grad_norm": grad_norm,
            "skipped_update": bad,
            "update_s": round(update_s, 4),
            "step_s": round(time.time() - t0, 4),
        }
        return StepResult(metrics, {"update_tokens": tokens, "samples": len(examples)})
