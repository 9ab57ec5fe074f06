"""`rpt train`: GRPO over RPT tasks with the prefix-matching reward (paper Sec. 3.2, Table 5).

    run_train(TrainConfig(tasks_dir="out/tasks", out="out/run", model="smollm2-135m", ...)) -> summary

One step, as named, timed phases:
    rollout    B contexts x G samples from the rollout engine (transformers or vLLM)
    reward     the prompt format's extraction + `rpttrain.reward` (prefix / first-token)
    advantage  group-normalized advantages (`rpttrain.algos`); dynamic sampling (DAPO) refills
               the batch with groups whose rewards differ, from step --dynamic-sampling-from
    update     clipped policy-gradient loss over completion tokens, micro-batched by a token
               budget, gradient clipping, AdamW; NaN/inf updates are skipped and counted
    checkpoint HF-format model + optimizer/scheduler/RNG/data cursor (`rpttrain.checkpoint`)

The run directory holds config.yaml (the resolved config), metrics.jsonl (one line per step),
samples.jsonl (completions every --sample-every steps), checkpoints/ and, when tensorboard is
installed, tb/. Log-probs for the update come from the training model itself; the engine's own
log-probs are only compared with them (`logprob_mismatch`), never trained on.

Compute accounting (FLOPs, logged per step and cumulatively; N = model parameters):
    6 * N per token through the update's forward+backward (a prompt shared by a group's samples
    counts once on the one-token fast path), plus 2 * N per token the rollout engine runs through
    the model (`RolloutEngine.forward_tokens`: one-token rollouts and vLLM's shared prefill run a
    prompt once per group, transformers generate() n times; plus the fed-back generated tokens).
    Counting what runs, not prompt x samples, keeps RPT and next-token runs comparable.

Left out on purpose: multi-GPU/FSDP (use the verl export for that), sequence packing, a value
model (GRPO needs none), and PPO epochs > 1 (the paper does one on-policy update per batch, so the
ratio is 1 and old log-probs equal the current ones; the clip is still applied as written).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from rptdata import faults
from rptdata.engine_choice import choose_engine
from rptdata.errors import ManifestMismatch, RptError
from rptdata.manifest import fingerprint, read_manifest, write_json_atomic, write_text_atomic
from rptdata.models import load_causal_lm, load_tokenizer, model_name, vocab_hash
from rpttrain import algos
from rpttrain.data import TRAINED_ON, DocWindows, EpochSampler, TaskRows, trained_on_record
from rpttrain.checkpoint import (
    list_checkpoints, load_master_weights, load_trainer_state, save_checkpoint, verify_checkpoint,
)
from rpttrain.precision import check_dtypes, dtype_name, resolve_precision
from rpttrain.prompts import build_prompt_ids, load_prompt_format
from rpttrain.reward import REWARDS, get_reward_fn
from rpttrain.rollout import Sampling, make_engine, stop_ids
from rpttrain.rollout.hf import left_pad

log = logging.getLogger(__name__)


OBJECTIVES = ("rpt", "ntp", "shaped-ntp")


class TrainingDiverged(RptError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of `rpt train`. Defaults are the paper's (Table 5) unless marked CPU."""

    tasks_dir: str
    out: str
    model: str = "smollm2-135m"
    objective: str = "rpt"
    steps: int = 1000
    batch_size: int = 256  # contexts per step (B)
    group_size: int = 8  # rollouts per context (G)
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 8192
    max_prompt_tokens: int = 4096
    prompt_template: str = "v0"
    reward: str = "prefix"
    scale_rewards: str = "group"  # group | none (Dr. GRPO)
    loss_agg: str = "token-mean"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    kl_coef: float = 0.0
    lr: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 0.2
    warmup_steps: int = 0
    dynamic_sampling_from: int = 500  # -1 disables
    dynamic_sampling_rounds: int = 3
    micro_batch_tokens: int = 16384
    engine: str = "auto"
    compute_dtype: str = "auto"  # forward/backward and rollouts: auto = bfloat16 on CUDA, float32 on CPU
    master_dtype: str = "float32"  # parameters, gradients, AdamW state (rpttrain.precision)
    device: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    sample_every: int = 10
    max_bad_steps: int = 5
    compute_budget: float | None = None  # FLOPs; stop (with a checkpoint) when reached
    allow_tokenizer_mismatch: bool = False
    trust_remote_code: bool = False
    vllm_gpu_memory_utilization: float = 0.3
    memory_check: bool = True  # estimate the run's memory before loading weights; refuse what cannot fit
    memory_budget_gib: float | None = None  # memory to plan for instead of the device's free memory
    # next-token baselines (--objective ntp | shaped-ntp)
    ntp_positions: str = "all"  # all: every token of the training documents | tasks: the task positions
    beta: float = -0.25
    topk: int = 100
    lambda_top: float = 0.0
    lambda_tail: float = -0.1
    progress: bool = True

    def __post_init__(self):
        check_dtypes(self.compute_dtype, self.master_dtype)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if self.ntp_positions not in ("all", "tasks"):
            raise ValueError("ntp_positions must be 'all' or 'tasks'")
        if self.objective != "rpt":
            if self.batch_size < 1 or self.topk < 1:
                raise ValueError("batch_size and topk must be at least 1")
            return
        if self.batch_size < 1 or self.group_size < 2:
            raise ValueError("batch_size must be >= 1 and group_size >= 2 (GRPO compares samples within a group)")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0: GRPO needs different samples within a group")
        if self.loss_agg not in algos.LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {', '.join(algos.LOSS_AGGS)}")
        if self.scale_rewards not in ("group", "none"):
            raise ValueError("scale_rewards must be 'group' or 'none'")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}")
        if self.steps < 1 or self.save_every < 1 or self.max_new_tokens < 1:
            raise ValueError("steps, save_every and max_new_tokens must be at least 1")
        if self.micro_batch_tokens < self.max_new_tokens + 1:
            raise ValueError(
                f"micro_batch_tokens ({self.micro_batch_tokens}) must hold at least one whole sequence "
                f"(max_new_tokens + prompt); raise it or lower max_new_tokens"
            )

    def identity(self) -> dict:
        """The settings that define the run (a resumed run must match them)."""
        d = asdict(self)
        if self.objective == "rpt":  # baseline-only knobs do not change an RPT run
            for k in ("ntp_positions", "beta", "topk", "lambda_top", "lambda_tail"):
                d.pop(k)
        for k in ("out", "steps", "progress", "save_every", "keep_checkpoints", "sample_every", "compute_budget",
                  "memory_check", "memory_budget_gib"):
            d.pop(k)
        return d


def config_from_dict(data: dict) -> TrainConfig:
    """Build a TrainConfig from YAML/dict, rejecting unknown keys by name."""
    known = {f.name for f in fields(TrainConfig)}
    if "dtype" in data:
        raise ValueError(
            "option 'dtype' was replaced by compute_dtype (what forward/backward and rollouts run in) and "
            "master_dtype (what the optimizer updates; float32 by default): see rpt train --help"
        )
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    return TrainConfig(**data)


# ---------------------------------------------------------------------------------------------
# data


DATA_CACHE = "data-cache"  # memory-mapped copies of the tasks / documents (rpttrain.data)


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class Rollout:
    """One sampled completion and what the update needs from it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: float
    advantage: float
    prediction: str | None
    truncated: bool
    engine_logprobs: list[float] | None


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.run_dir = Path(config.out)
        from rptdata.models import resolve_device

        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.compute_dtype, config.master_dtype, self.device)
        self.fmt = load_prompt_format(config.prompt_template)
        self.reward_fn = get_reward_fn(config.reward)
        self.tasks_manifest = read_manifest(Path(config.tasks_dir), "make-tasks")
        self.stop_flag = False

    # -- setup --------------------------------------------------------------------------------
    def setup(self, resume: bool, overwrite: bool) -> None:
        c = self.config
        engine = choose_engine(c.engine, self.device) if c.objective == "rpt" else "hf"
        if c.memory_check:  # before anything is loaded or written: a run that cannot fit stops here
            from rpttrain.memory import preflight

            preflight(c, self.device, self.precision, engine)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.run_dir / "run.json"
        ident = {"train": c.identity(), "tasks": self.tasks_manifest.get("fingerprint")}
        checkpoints = list_checkpoints(self.run_dir)
        if run_file.exists() and not overwrite:
            previous = json.loads(run_file.read_text())
            if previous["fingerprint"] != fingerprint(ident):
                raise ManifestMismatch(
                    f"{self.run_dir} holds a run with other settings; use another --out or --overwrite"
                )
            if checkpoints and not resume:
                raise ManifestMismatch(
                    f"{self.run_dir} already has checkpoints (latest {checkpoints[-1].name}); pass --resume to "
                    "continue it, or --overwrite to start over"
                )
        if overwrite:
            import shutil

            for name in ("checkpoints", "metrics.jsonl", "samples.jsonl", "tb", "run.json", "summary.json", DATA_CACHE):
                p = self.run_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            checkpoints = []
        write_json_atomic(run_file, {"fingerprint": fingerprint(ident), **ident})
        _write_yaml(self.run_dir / "config.yaml", asdict(c))
        # what this run trains on, for `rpt eval`'s held-out check (atomic: a tmp file, then os.replace)
        write_json_atomic(self.run_dir / TRAINED_ON,
                          trained_on_record(c.objective, c.ntp_positions, c.tasks_dir, self.tasks_manifest))

        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        start_from = checkpoints[-1] if (resume and checkpoints) else None
        if start_from:  # sizes and checksums of its weights and optimizer state, before loading them
            verify_checkpoint(start_from, checkpoints[-2] if len(checkpoints) > 1 else None)
        model_source = str(start_from) if start_from else c.model
        self.tokenizer = load_tokenizer(c.model, trust_remote_code=c.trust_remote_code)
        self._check_tokenizer()
        master = dtype_name(self.precision.master)
        self.model = load_causal_lm(model_source, dtype=master, device=self.device, trust_remote_code=c.trust_remote_code)
        if start_from and load_master_weights(start_from, self.model):
            log.info("resumed the exact %s master weights of %s", master, start_from.name)
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ref_model = None
        if c.kl_coef > 0:  # the paper uses 0: then no reference model is loaded at all
            self.ref_model = load_causal_lm(c.model, dtype=dtype_name(self.precision.compute), device=self.device).eval()
            self.ref_model.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay
        )
        warm = max(c.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        self.step = 0
        self.totals = {"flops": 0.0, "update_tokens": 0, "rollout_tokens": 0, "rollout_forward_tokens": 0, "samples": 0}
        cursor = {"epoch": 0, "offset": 0}
        if start_from:
            state = load_trainer_state(start_from, self.optimizer, self.scheduler)
            self.step, cursor, self.totals = state["step"], state["cursor"], state["totals"]
            log.info("resumed from %s", start_from)
        # steps logged after the checkpoint we start from (all of them when starting afresh) are redone
        _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        _truncate_jsonl(self.run_dir / "samples.jsonl", self.step)
        cache = self.run_dir / DATA_CACHE
        if c.objective != "rpt" and c.ntp_positions == "all":
            source = DocWindows(self.tasks_manifest, c.max_prompt_tokens, cache)
        else:
            source = TaskRows(c.tasks_dir, cache)
        self.sampler = EpochSampler(source, c.seed, **cursor)
        if engine == "vllm":
            from rptdata.models import local_model_dir

            kwargs = {"model_path": str(start_from) if start_from else local_model_dir(c.model),
                      "gpu_memory_utilization": c.vllm_gpu_memory_utilization, "seed": c.seed,
                      "dtype": dtype_name(self.precision.compute)}
        else:  # the transformers engine shares the training model and generates in the compute dtype
            kwargs = {"compute_dtype": self.precision.compute}
        self.engine = make_engine(engine, self.model, self.tokenizer, **kwargs)
        if engine == "vllm" and start_from:
            self.engine.update_weights(self.model)
        self.stops = stop_ids(self.tokenizer)
        self.tb = _tensorboard(self.run_dir / "tb")
        faults.hit("begin")

    def _check_tokenizer(self) -> None:
        want = self.tasks_manifest.get("tokenizer", {}).get("vocab_hash")
        have = vocab_hash(self.tokenizer)
        if want and want != have and not self.config.allow_tokenizer_mismatch:
            raise ManifestMismatch(
                f"the tasks were built with tokenizer {self.tasks_manifest['tokenizer'].get('name')} "
                f"(vocab {want}) but the policy {model_name(self.config.model)} has vocab {have}; the "
                "continuation boundaries would not be the policy's tokens. Rebuild the tasks with the "
                "policy's tokenizer, or pass --allow-tokenizer-mismatch to score predictions on the "
                "corpus tokenizer's boundaries anyway."
            )

    # -- phases -------------------------------------------------------------------------------
    def rollout(self, tasks: list[dict], round_index: int) -> tuple[list[list], dict]:
        c = self.config
        prompts = [build_prompt_ids(self.fmt, t["context"], self.tokenizer, c.max_prompt_tokens) for t in tasks]
        sampling = Sampling(
            n=c.group_size, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
            seed=c.seed * 1_000_003 + self.step * 101 + round_index, stop_token_ids=self.stops,
        )
        groups = self.engine.generate(prompts, sampling)
        return list(zip(prompts, groups)), {"forward_tokens": self.engine.forward_tokens(prompts, groups, sampling)}

    def score(self, tasks, prompted) -> list[list[Rollout]]:
        out = []
        for task, (prompt, group) in zip(tasks, prompted):
            rolls = []
            for comp in group:
                pred = self.fmt.extract(comp.text)
                r = self.reward_fn(pred, task["continuation"], task["boundaries"])
                rolls.append(Rollout(prompt, comp.token_ids, comp.text, r, 0.0, pred, comp.finish_reason == "length", comp.logprobs))
            out.append(rolls)
        return out

    def advantages(self, groups: list[list[Rollout]]) -> None:
        rewards = torch.tensor([[r.reward for r in g] for g in groups], dtype=torch.float32)
        adv = algos.group_advantages(rewards, scale=self.config.scale_rewards)
        for g, a in zip(groups, adv.tolist()):
            for r, x in zip(g, a):
                r.advantage = x

    def update(self, rollouts: list[Rollout]) -> dict:
        c = self.config
        rollouts = [r for r in rollouts if r.completion_ids]
        stats = {"clip_frac": 0.0, "logprob_mismatch": None, "kl": 0.0, "loss": 0.0, "update_tokens": 0}
        if not rollouts:
            return {**stats, "grad_norm": 0.0, "skipped": False}
        batches = self._micro_batches(rollouts)
        all_mask = torch.zeros(len(rollouts), max(len(r.completion_ids) for r in rollouts))
        for i, r in enumerate(rollouts):
            all_mask[i, : len(r.completion_ids)] = 1
        denom = algos.loss_denominator(all_mask, c.loss_agg, max_len=c.max_new_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        clipped = total = 0.0
        mismatch_sum, mismatch_n = 0.0, 0
        for mb in batches:
            batch = [rollouts[i] for i in mb]
            with self.precision.autocast():  # log-probs and the loss come out in float32
                logp, mask = self._completion_logprobs(self.model, batch)
                old = logp.detach()  # one on-policy update per batch: old policy == current policy
                adv = torch.tensor([r.advantage for r in batch], dtype=torch.float32, device=logp.device)
                loss_tok, was_clipped = algos.policy_loss(logp, old, adv, c.clip_eps, c.clip_eps_high)
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref, _ = self._completion_logprobs(self.ref_model, batch)
                    kl = algos.kl_k3(logp, ref)
                    loss_tok = loss_tok + c.kl_coef * kl
                    stats["kl"] += float((kl * mask).sum())
                loss = algos.aggregate_loss(loss_tok, mask, c.loss_agg, denom)
            loss.backward()
            stats["loss"] += float(loss.detach())
            clipped += float((was_clipped.float() * mask).sum())
            total += float(mask.sum())
            stats["update_tokens"] += self._forward_tokens(batch)
            for j, r in enumerate(batch):
                if r.engine_logprobs:
                    n = min(len(r.engine_logprobs), int(mask[j].sum()))
                    eng = torch.tensor(r.engine_logprobs[:n])
                    mismatch_sum += float((eng - old[j, :n].cpu()).abs().sum())
                    mismatch_n += n
        grad_norm, bad = self._optimizer_step(stats["loss"])
        stats.update(
            clip_frac=clipped / max(total, 1),
            kl=stats["kl"] / max(total, 1),
            grad_norm=grad_norm,
            skipped=bad,
            logprob_mismatch=(mismatch_sum / mismatch_n) if mismatch_n else None,
        )
        return stats

    def _optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip, then step, unless the loss or gradient is not finite (then skip and say so)."""
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped update still advances the schedule, on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return grad_norm, bad

    @staticmethod
    def _single_token(batch: list[Rollout]) -> bool:
        return all(len(r.completion_ids) == 1 for r in batch)

    def _forward_tokens(self, batch: list[Rollout]) -> int:
        """Tokens the update's forward actually runs (a shared prompt counts once on the fast path)."""
        if self._single_token(batch):
            return sum(len(p) for p in {tuple(r.prompt_ids) for r in batch})
        return sum(len(r.prompt_ids) + len(r.completion_ids) for r in batch)

    def _micro_batches(self, rollouts: list[Rollout]) -> list[list[int]]:
        """Indices grouped into micro-batches of at most micro_batch_tokens padded tokens; the
        samples of one prompt stay together (sorted by length, then prompt)."""
        c = self.config
        order = sorted(range(len(rollouts)), key=lambda i: (len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids), rollouts[i].prompt_ids))
        single = self._single_token(rollouts)
        batches, cur, rows, seen = [], [], 0, set()
        for i in order:
            r = rollouts[i]
            width = len(r.prompt_ids) + len(r.completion_ids)
            new_row = not single or tuple(r.prompt_ids) not in seen
            if cur and new_row and (rows + 1) * width > c.micro_batch_tokens:
                batches.append(cur)
                cur, rows, seen = [], 0, set()
                new_row = True
            cur.append(i)
            if new_row:
                rows += 1
                seen.add(tuple(r.prompt_ids))
        batches.append(cur)
        return batches

    def _completion_logprobs(self, model, batch: list[Rollout]):
        """Log-probs [N, T] (left-aligned) and mask of each completion token under `model` at the
        sampling temperature.

        Sequences are left-padded so every completion ends at the last position; only the last
        T+1 positions go through the LM head (logits_to_keep), not the whole prompt. When every
        completion is one token, each distinct prompt is run once and its samples share the logits
        (exactly the same numbers, G times less compute)."""
        if self._single_token(batch):
            return self._shared_prompt_logprobs(model, batch)
        t_max = max(len(r.completion_ids) for r in batch)
        ids, attn, pos = left_pad([r.prompt_ids + r.completion_ids for r in batch])
        comp, _, _ = left_pad([r.completion_ids for r in batch])
        dev = self.device
        out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), logits_to_keep=t_max + 1)
        logits = out.logits[:, :-1]  # position k predicts token k+1
        logp = algos.token_logprobs(logits, comp.to(dev), self.config.temperature)
        # right-align -> left-align so column j is the j-th completion token (matches engine order)
        logp_left = torch.zeros_like(logp)
        mask_left = torch.zeros(len(batch), t_max)
        for i, r in enumerate(batch):
            n = len(r.completion_ids)
            logp_left[i, :n] = logp[i, t_max - n :]
            mask_left[i, :n] = 1
        return logp_left, mask_left.to(dev)

    def _shared_prompt_logprobs(self, model, batch: list[Rollout]):
        prompts = list(dict.fromkeys(tuple(r.prompt_ids) for r in batch))
        row_of = {p: i for i, p in enumerate(prompts)}
        ids, attn, pos = left_pad(prompts)
        dev = self.device
        logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), logits_to_keep=1).logits
        rows = torch.tensor([row_of[tuple(r.prompt_ids)] for r in batch], device=dev)
        tokens = torch.tensor([[r.completion_ids[0]] for r in batch], device=dev)
        logp = algos.token_logprobs(logits[rows], tokens, self.config.temperature)  # [N, 1]
        return logp, torch.ones_like(logp)

    # -- loop ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        c = self.config
        bad_in_a_row = 0
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", disable=not c.progress, dynamic_ncols=True)
        stopped_by = None
        try:
            while self.step < c.steps:
                metrics = self.train_step()
                self.step += 1
                metrics["step"] = self.step
                self._log(metrics)
                faults.hit("train-step")
                bar.update(1)
                if "reward_mean" in metrics:
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", zero_var=f"{metrics['zero_variance_share']:.2f}")
                else:
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
                bad_in_a_row = bad_in_a_row + 1 if metrics["skipped_update"] else 0
                if bad_in_a_row >= c.max_bad_steps:
                    self.save()
                    raise TrainingDiverged(
                        f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step "
                        f"{self.step}); stopped. Lower --lr, or check the tasks and the model's dtype."
                    )
                budget_hit = c.compute_budget is not None and self.totals["flops"] >= c.compute_budget
                if self.step % c.save_every == 0 or self.step == c.steps or budget_hit or self.stop_flag:
                    self.save()
                if budget_hit:
                    stopped_by = "compute_budget"
                    break
                if self.stop_flag:
                    stopped_by = "signal"
                    break
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()
        summary = {"steps": self.step, "stopped_by": stopped_by, "totals": self.totals, "run_dir": str(self.run_dir)}
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %s: finishing the current step, then saving a checkpoint", signum)
        self.stop_flag = True

    def train_step(self) -> dict:
        return self.rpt_step() if self.config.objective == "rpt" else self.ntp_step()

    def ntp_examples(self) -> list[tuple[list[int], int]]:
        """(token ids, number of trailing positions to train) for one batch of the baselines."""
        c = self.config
        items = self.sampler.take(c.batch_size)
        if c.ntp_positions == "all":
            return [(chunk.tolist(), len(chunk) - 1) for chunk in items]
        fmt = load_prompt_format("continuation")
        out = []
        for t in items:
            ids = build_prompt_ids(fmt, t["context"], self.tokenizer, c.max_prompt_tokens - 1)
            target = t.get("target_id") if not c.allow_tokenizer_mismatch else None
            if target is None:
                target = self.tokenizer(t["continuation"], add_special_tokens=False)["input_ids"][0]
            out.append((ids + [int(target)], 1))
        return out

    def ntp_step(self) -> dict:
        """One step of next-token training (cross-entropy, or the shaped objective), by micro-batch."""
        c = self.config
        t0 = time.time()
        examples = self.ntp_examples()
        total_positions = sum(n for _, n in examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        batches, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * len(examples[i][0]) > c.micro_batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        batches.append(cur)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = correct = ent_sum = 0.0
        tokens = 0
        for mb in batches:
            batch = [examples[i] for i in mb]
            ids, attn, pos = left_pad([seq for seq, _ in batch])  # trained positions are the last ones
            width = ids.shape[1]
            keep = max(n for _, n in batch)
            with self.precision.autocast():  # the losses below upcast the logits to float32
                out = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                 position_ids=pos.to(self.device), logits_to_keep=keep + 1)
            logits = out.logits[:, :-1]  # [N, keep, V]: column j predicts token width - keep + j
            targets = ids[:, width - keep :].to(self.device)
            mask = torch.zeros(len(batch), keep, dtype=torch.bool)
            for i, (_, n) in enumerate(batch):
                mask[i, keep - n :] = True
            mask = mask.to(self.device)
            sel_logits, sel_targets = logits[mask], targets[mask]
            if c.objective == "ntp":
                per_pos = algos.shaped_ntp_loss(sel_logits, sel_targets)  # beta 0, lambdas 0: cross-entropy
            else:
                per_pos = algos.shaped_ntp_loss(sel_logits, sel_targets, c.beta, c.topk, c.lambda_top, c.lambda_tail)
            loss = per_pos.sum() / total_positions
            loss.backward()
            with torch.no_grad():
                loss_sum += float(loss)
                correct += float((sel_logits.argmax(-1) == sel_targets).sum())
                ent_sum += float(algos.entropy_of_logits(sel_logits).sum())
            tokens += sum(len(seq) for seq, _ in batch)
        update_s = time.time() - t0
        grad_norm, bad = self._optimizer_step(loss_sum)
        flops = 6.0 * self.n_params * tokens
        self.totals["flops"] += flops
        self.totals["update_tokens"] += tokens
        self.totals["samples"] += len(examples)
        return {
            "loss": loss_sum,
            "accuracy": correct / max(total_positions, 1),
            "entropy_mean": ent_sum / max(total_positions, 1),
            "positions": total_positions,
            "update_tokens": tokens,
            "grad_norm": grad_norm,
            "skipped_update": bad,
            "lr": self.scheduler.get_last_lr()[0],
            "update_s": round(update_s, 4),
            "step_s": round(time.time() - t0, 4),
            "flops": flops,
            "flops_total": self.totals["flops"],
        }

    def rpt_step(self) -> dict:
        c = self.config
        timings = {}
        t0 = time.time()
        dynamic = 0 <= c.dynamic_sampling_from <= self.step
        kept: list[list[Rollout]] = []
        drawn = rounds = 0
        zero_var = groups_seen = 0
        all_groups: list[list[Rollout]] = []
        gen_tokens = prompt_tokens = forward_tokens = 0
        timings["rollout_s"] = timings["reward_s"] = 0.0
        while True:
            tasks = self.sampler.take(c.batch_size)
            drawn += len(tasks)
            t = time.time()
            prompted, info = self.rollout(tasks, rounds)
            forward_tokens += info["forward_tokens"]
            timings["rollout_s"] += time.time() - t
            t = time.time()
            groups = self.score(tasks, prompted)
            timings["reward_s"] += time.time() - t
            all_groups += groups
            for g in groups:
                gen_tokens += sum(len(r.completion_ids) for r in g)
                prompt_tokens += sum(len(r.prompt_ids) for r in g)
                rewards = [r.reward for r in g]
                groups_seen += 1
                if max(rewards) == min(rewards):
                    zero_var += 1
                    if dynamic:
                        continue
                kept.append(g)
            rounds += 1
            if not dynamic or len(kept) >= c.batch_size or rounds > c.dynamic_sampling_rounds:
                break
        kept = kept[: c.batch_size]
        t = time.time()
        self.advantages(kept) if kept else None
        timings["advantage_s"] = time.time() - t
        t = time.time()
        upd = self.update([r for g in kept for r in g])
        timings["update_s"] = time.time() - t
        t = time.time()
        if self.engine.name != "hf" and not upd["skipped"]:
            self.engine.update_weights(self.model)
        timings["weight_sync_s"] = time.time() - t

        # compute actually spent: rollouts count the tokens the engine ran (a prompt its samples
        # share counts once where the engine computes it once), not prompt x samples
        flops = 6.0 * self.n_params * upd["update_tokens"] + 2.0 * self.n_params * forward_tokens
        self.totals["flops"] += flops
        self.totals["update_tokens"] += upd["update_tokens"]
        self.totals["rollout_tokens"] += gen_tokens + prompt_tokens
        self.totals["rollout_forward_tokens"] = self.totals.get("rollout_forward_tokens", 0) + forward_tokens
        self.totals["samples"] += sum(len(g) for g in all_groups)
        rolls = [r for g in all_groups for r in g]
        lengths = [len(r.completion_ids) for r in rolls]
        metrics = {
            "reward_mean": float(np.mean([r.reward for r in rolls])),
            "accuracy": float(np.mean([r.reward == 1.0 for r in rolls])),
            "zero_variance_share": zero_var / max(groups_seen, 1),
            "groups_trained": len(kept),
            "contexts_drawn": drawn,
            "sampling_rounds": rounds,
            "completion_len_mean": float(np.mean(lengths)),
            "completion_len_max": int(max(lengths)),
            "truncated_share": float(np.mean([r.truncated for r in rolls])),
            "no_prediction_share": float(np.mean([r.prediction is None for r in rolls])),
            "clip_frac": upd["clip_frac"],
            "kl": upd["kl"],
            "loss": upd["loss"],
            "grad_norm": upd["grad_norm"],
            "skipped_update": upd["skipped"],
            "lr": self.scheduler.get_last_lr()[0],
            "logprob_mismatch": upd["logprob_mismatch"],
            "rollout_tokens_per_s": gen_tokens / max(timings["rollout_s"], 1e-9),
            "rollout_forward_tokens": forward_tokens,
            "update_tokens": upd["update_tokens"],
            **{k: round(v, 4) for k, v in timings.items()},
            "step_s": round(time.time() - t0, 4),
            "flops": flops,
            "flops_total": self.totals["flops"],
        }
        if c.sample_every and (self.step + 1) % c.sample_every == 0:
            with (self.run_dir / "samples.jsonl").open("a") as f:
                for g in all_groups[:2]:
                    for r in g:
                        f.write(json.dumps({"step": self.step + 1, "completion": r.text, "prediction": r.prediction, "reward": r.reward}) + "\n")
        return metrics

    def _log(self, metrics: dict) -> None:
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    self.tb.add_scalar(k, v, metrics["step"])

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.tokenizer, self.optimizer, self.scheduler,
            {"cursor": self.sampler.cursor(), "totals": self.totals, "n_params": self.n_params,
             "precision": self.precision.describe()},
            keep=self.config.keep_checkpoints, hf_dtype=self.precision.compute,
        )


def run_train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    trainer = Trainer(config)
    trainer.setup(resume=resume, overwrite=overwrite)
    try:
        return trainer.run()
    finally:
        trainer.engine.close()


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop lines of steps after `step` (they are redone after a resume)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut short by a crash (or empty) is dropped (step = inf)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
