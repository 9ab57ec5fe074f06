"""Builders for small, real artefacts used by the training and evaluation tests: a tiny random
Llama policy over the tiny byte-level BPE tokenizer, the tiny training run's config, and a tasks
directory written through the same StageDir machinery as `rpt make-tasks`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from rptdata.io import STAGE_TASKS as STAGE
from rptdata.models import load_tokenizer, vocab_hash
from rptdata.stage import StageDir
from rptdata.tasks.taskdef import TASKS_SCHEMA


def tiny_llama(
    folder: Path, tokenizer_dir: Path, seed: int = 0, tie: bool = False, warm_texts=(), warm_steps: int = 20
) -> Path:
    """A tiny random Llama over the tiny tokenizer. `tie`: the LM head is the input embedding (as
    in SmolLM2). `warm_texts`: a few steps of next-token training on them first, so the model
    predicts their tokens with middling probability: GRPO groups over tasks from these texts then
    hold both rewards and the update has a gradient (a random model never earns a reward, and
    every gradient of its run is exactly zero)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    if warm_texts:
        warm_up(model, tok, warm_texts, warm_steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def warm_up(model, tok, texts, steps: int, lr: float = 1e-2) -> None:
    """`steps` full-batch AdamW steps of next-token cross-entropy on `texts` (right-padded)."""
    import torch

    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(attention == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        opt.step()


def tiny_train_config(tasks, model, out, /, **overrides):
    """The tests' tiny `rpt train` run: a few one-token GRPO steps of the tiny model on CPU, a
    checkpoint after every step, no samples logged, no dynamic sampling; `overrides` change any
    TrainConfig field."""
    from rpttrain.config import TrainConfig

    base = dict(
        tasks_dir=str(tasks),
        out=str(out),
        model=str(model),
        steps=3,
        batch_size=8,
        group_size=8,
        temperature=1.0,
        max_new_tokens=1,
        max_prompt_tokens=32,
        prompt_template="continuation",
        lr=3e-2,
        grad_clip=1.0,
        micro_batch_tokens=256,
        save_every=1,
        sample_every=0,
        progress=False,
        device="cpu",
        dynamic_sampling_from=-1,
        seed=3,
    )
    return TrainConfig(**{**base, **overrides})


def boundaries_of(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out, total = [], 0
    for i in ids:
        total += len(tokenizer.decode([i]).encode("utf-8"))
        out.append(total)
    return out


def write_tasks_dir(
    out: Path,
    tokenizer_dir: str,
    pairs: list[tuple[str, str]],
    eval_pairs: list[tuple[str, str]] = (),
    entropies: list[float] | None = None,
    prepared_dir: str | None = None,
) -> Path:
    """A finished make-tasks directory holding (context, continuation) tasks."""
    tok = load_tokenizer(tokenizer_dir)
    stage = StageDir(out, STAGE, ["train", "eval"])
    stage.begin({"synthetic": [pairs, list(eval_pairs)]}, overwrite=True)
    for split, items in (("train", pairs), ("eval", eval_pairs)):
        rows = []
        for i, (ctx, cont) in enumerate(items):
            ent = entropies[i % len(entropies)] if entropies else 2.0
            band = "hard" if ent > 1.5 else "medium" if ent > 1.0 else "easy" if ent > 0.5 else "other"
            rows.append(
                {
                    "task_id": f"{split}-doc{i}@1",
                    "doc_id": f"{split}-doc{i}",
                    "pos": 1,
                    "context": ctx,
                    "continuation": cont,
                    "boundaries": boundaries_of(tok, cont),
                    "entropy": ent,
                    "band": band,
                    "target_id": tok(cont, add_special_tokens=False)["input_ids"][0],
                    "context_tokens": len(tok(ctx, add_special_tokens=False)["input_ids"]),
                    "target_logprob": -1.0,
                    "target_rank": 1,
                }
            )
        table = pa.Table.from_pylist(rows, schema=TASKS_SCHEMA) if rows else TASKS_SCHEMA.empty_table()
        stage.write_shard(split, 0, table, {"tasks": len(rows)})
    stage.finish(
        {
            "tokenizer": {"name": "tiny", "spec": tokenizer_dir, "vocab_hash": vocab_hash(tok)},
            "split": {"seed": 0, "eval_fraction": 0.5, "hash": "sha256"},
            "prepared_dir": prepared_dir,
            "counts": {"tasks": {"train": len(pairs), "eval": len(eval_pairs)}},
        }
    )
    return out


def rewrite_shard(root: Path, path: Path, table) -> None:
    """Replace a finished stage's shard with `table` and re-record its size and checksum in the
    manifest, as a stage that wrote it would have (tests that edit shards on purpose)."""
    import json

    import pyarrow.parquet as pq

    from rptdata.io import MANIFEST, file_digest

    pq.write_table(table, path)
    manifest_path = Path(root) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    rel = str(Path(path).relative_to(root))
    if rel in (manifest.get("files") or {}):
        manifest["files"][rel].update(file_digest(path), rows=table.num_rows)
        manifest_path.write_text(json.dumps(manifest, indent=2))


def sharp_llama(folder: Path, tokenizer_dir: Path, scale: float = 1000.0, seed: int = 0) -> Path:
    """`tiny_llama` with its output layer multiplied by `scale`: its logits are far apart, so
    sampling at temperature 1 all but always gives the greedy token, and a task whose
    continuation is that token is right (see `greedy_pairs`)."""
    import torch
    from transformers import AutoModelForCausalLM

    tiny_llama(folder, tokenizer_dir, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(folder)
    return folder


def greedy_pairs(model_dir: Path, tokenizer_dir: Path, contexts: list[str]) -> list[tuple[str, str]]:
    """(context, the model's greedy next token as text) for each context whose greedy token is
    whole text (not part of a UTF-8 character, not the end of text): tasks the model gets right."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        for context in contexts:
            ids = tok(context, add_special_tokens=False)["input_ids"]
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            text = tok.decode([token])
            if token != tok.eos_token_id and "\ufffd" not in text and boundaries_of(tok, text) == [len(text.encode())]:
                out.append((context, text))
    return out
