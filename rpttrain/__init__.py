"""rpttrain: RPT tasks, prompts, the prefix-matching reward, GRPO training and evaluation."""
