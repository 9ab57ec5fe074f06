"""A verl agent loop that sends raw prompts (the `continuation` format) to the rollout as is.

verl 0.9.1's dataset no longer tokenizes; its agent loops apply the chat template, so a raw
context would reach a base model wrapped in the template (and SmolLM's system prompt). This loop
renders rows marked `extra_info.raw_prompt` exactly as `rpt train` does
(`raw_prompt_ids`: `rpttrain.prompts.build_prompt_ids`, the context's start cut to fit
max_prompt_length); any other row goes through verl's own single-turn loop.

`rpt train --backend verl` writes RUN/verl/agent_loop.yaml naming it and sets
    actor_rollout_ref.rollout.agent.agent_loop_config_path=RUN/verl/agent_loop.yaml
    actor_rollout_ref.rollout.agent.default_agent_loop=rpt_raw_prompt
The class is imported by verl's rollout workers, so rpt must be installed in verl's environment
(it is anyway, for the reward function). Only `raw_prompt_ids` is importable without verl.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

AGENT_NAME = "rpt_raw_prompt"
TARGET = "rpttrain.backends.verl_agent_loop.RawPromptAgentLoop"


def raw_prompt_ids(extra_info: Mapping[str, Any], tokenizer: Any, max_prompt_tokens: int) -> list[int]:
    """The prompt token ids `rpt train` would feed for a verl row's `extra_info`."""
    from rpttrain.prompts import build_prompt_ids, load_prompt_format

    return build_prompt_ids(
        load_prompt_format(extra_info["format"]), extra_info["prompt_text"], tokenizer, max_prompt_tokens
    )


def agent_loop_yaml() -> str:
    """The agent loop config file verl reads (a list of {name, _target_})."""
    return f"- name: {AGENT_NAME}\n  _target_: {TARGET}\n"


try:
    from uuid import uuid4

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop
    from verl.utils.profiler import simple_timer
except ImportError:  # verl is not installed here: only the helpers above are usable
    SingleTurnAgentLoop = None

if SingleTurnAgentLoop is not None:

    class RawPromptAgentLoop(SingleTurnAgentLoop):
        """Single turn; raw rows are tokenized by rpt, not through the chat template."""

        async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs) -> AgentLoopOutput:
            extra_info = kwargs.get("extra_info") or {}
            if not extra_info.get("raw_prompt"):
                return await super().run(sampling_params, priority=priority, **kwargs)
            prompt_ids = raw_prompt_ids(extra_info, self.tokenizer, self.prompt_length)
            metrics: dict[str, Any] = {}
            with simple_timer("generate_sequences", metrics):
                output = await self.server_manager.generate(
                    request_id=uuid4().hex,
                    prompt_ids=prompt_ids,
                    sampling_params=sampling_params,
                    priority=int(priority),
                )
            response_ids = list(output.token_ids)[: self.response_length]
            logprobs = list(output.log_probs)[: self.response_length] if output.log_probs else None
            metrics["num_preempted"] = output.num_preempted if output.num_preempted is not None else -1
            result = AgentLoopOutput(
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                response_mask=[1] * len(response_ids),
                response_logprobs=logprobs,
                multi_modal_data={},
                num_turns=2,
                metrics=AgentLoopMetrics(**metrics),
                extra_fields=dict(output.extra_fields),
            )
            result.extra_fields.update({"turn_scores": [], "tool_rewards": []})
            return result
