"""Speculative decoding on the reference model: what each phase costs and what the head buys.

One run, all on the same held-out prompts and the same regenerated training data:

1. the optjob EAGLE-3 stage with its defaults (configs/speculative.yaml) on the trained reference
   model (scripts/make_reference_model.py), built-in prompts: seconds and peak RSS of each phase
   (read data, regenerate, train, evaluate) from the stage's own figures;
2. the published head (loaded back from its files) at k = 3 and k = 5;
3. an untrained head of the same shape (the floor) at k = 3 and k = 5;
4. a classic draft LM (a 2-layer Llama with the target's tokenizer) trained the same way: on the same
   regenerated conversations, for the same epochs, with next-token cross-entropy; measured at k = 3, 5.

Every figure is lossless-checked against plain greedy decoding. Goal: mean accepted length >= 3.0 at
k = 3 on the reference model.

    .venv/bin/python scripts/bench_speculative.py            # ~10-15 min on 2 cores
    .venv/bin/python scripts/bench_speculative.py --quick    # the toy reference model, small settings (smoke)
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_common  # noqa: E402


def train_draft_lm(target: Any, samples: list[Any], *, epochs: int, seed: int) -> tuple[Any, float]:
    """A 2-layer Llama sharing the target's tokenizer, trained on the regenerated conversations."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = target.config
    torch.manual_seed(seed)
    draft = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=2, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
        )
    )  # fmt: skip
    with torch.no_grad():  # start from the target's embeddings, as EAGLE-3 does
        draft.model.embed_tokens.weight.copy_(target.embed.weight.float())
        draft.lm_head.weight.copy_(target.lm_head.weight.float())
    optimizer = torch.optim.AdamW(draft.parameters(), lr=2e-3)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    started = time.monotonic()
    draft.train()
    for _ in range(epochs):
        for batch in batches:
            width = max(len(samples[i].ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(samples[i].ids)] = torch.tensor(samples[i].ids)
                labels[row, : len(samples[i].ids)] = torch.tensor(samples[i].ids)
            loss = draft(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return draft.eval(), time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the toy reference model, small settings (smoke)")
    parser.add_argument("--json", type=Path, help="also write the result record here")
    opts = parser.parse_args()
    bench_common.exit_on_sigterm()

    import torch

    from optjob.api.shapes import ModelSpeculativeDecodingConfig
    from optjob.pipeline.stage import StageContext, technique_for
    from optjob.runtime.events import EventSink
    from optjob.targets.catalog import instance
    from optjob.techniques.speculative.eagle3 import load_head
    from optjob.techniques.speculative.evaluate import DraftModelProposer, measure, reference_outputs
    from optjob.techniques.speculative.params import resolve_params, speculative_rules
    from optjob.techniques.speculative.target import eos_ids, load_target
    from optjob.techniques.speculative.technique import prepare_training_data
    from optjob.techniques.speculative.train import choose_draft_vocab, init_head

    env: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-speculative-"))
    try:
        from make_reference_model import QUICK, build_reference_model

        if opts.quick:  # the toy reference model (seconds to build) and small settings: a smoke run
            # EAGLE-3 fuses three layers' states, so the toy gets four decoder layers instead of two
            model_dir = build_reference_model(dataclasses.replace(QUICK, layers=4), log_every=0).model_dir
            env = {"OPTION_EAGLE_MAX_SAMPLES": "64", "OPTION_EAGLE_EPOCHS": "2", "OPTION_EAGLE_MAX_SEQ_LEN": "128",
                   "OPTION_EAGLE_EVAL_PROMPTS": "6"}  # fmt: skip
        else:
            model_dir = build_reference_model().model_dir
        record = bench_common.banner("speculative decoding (EAGLE-3)", {"model": str(model_dir), "env": env})
        tech = technique_for("ModelSpeculativeDecodingConfig")
        target_spec = instance("ml.g6.12xlarge")
        stage = tech.plan(ModelSpeculativeDecodingConfig(technique="EAGLE"), env, target_spec, path="bench")
        out = work / "out"
        out.mkdir()
        ctx = StageContext(job_name="bench", input_dir=model_dir, output_dir=out, work_dir=work, target=target_spec,
                           env=env, events=EventSink())  # fmt: skip
        print(f"optjob stage with {stage.params} ... ({bench_common.load_note()})", flush=True)
        started = time.monotonic()
        result = tech.run(stage, ctx)
        stage_seconds = time.monotonic() - started
        metrics = result.metrics
        phases = metrics["phases"]
        bench_common.print_table(
            ["phase", "seconds", "peak RSS MiB"],
            [[name, f["seconds"], f["peak_rss_mib"]] for name, f in phases.items()],
            title=f"optjob EAGLE-3 stage: {stage_seconds:.0f} s, {metrics['train_conversations']} conversations, "
            f"{metrics['supervised_tokens']} supervised tokens, draft vocabulary {metrics['draft_vocab_size']}",
        )

        # the same data again for the classic draft LM (regeneration is deterministic: greedy)
        params = resolve_params(env, path="bench")
        target = load_target(model_dir)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        quiet = StageContext(job_name="bench", input_dir=model_dir, output_dir=work / "x", work_dir=work,
                             target=target_spec, env=env, events=EventSink())  # fmt: skip
        samples, prompts, _ = prepare_training_data(params, quiet, target, tokenizer)
        draft_lm, draft_seconds = train_draft_lm(target, samples, epochs=params.epochs, seed=0)
        head, _ = load_head(out / "speculator")
        vocab = choose_draft_vocab(samples, target.vocab_size, speculative_rules().trainer)
        floor = init_head(target, vocab, target.aux_ids, speculative_rules().trainer.seed).eval()
        eos = eos_ids(model_dir, tokenizer)
        new_tokens = speculative_rules().evaluation.new_tokens
        sink, cancel = EventSink(), ctx.cancel
        refs, greedy_s = reference_outputs(target, prompts, new_tokens, eos, events=sink, cancel=cancel)
        rows, figures = [], {}
        for k in (3, 5):
            for name, proposer in (("EAGLE-3 head (optjob)", head), ("untrained head (floor)", floor),
                                   ("draft LM, 2 layers", DraftModelProposer(draft_lm))):  # fmt: skip
                got = measure(target, proposer, prompts, refs, k=k, new_tokens=new_tokens, eos=eos, label=name,
                              events=sink, cancel=cancel).as_dict()  # fmt: skip
                figures[f"{name} k={k}"] = got
                rows.append([name, k, got["acceptance_rate"], got["mean_accepted_length"],
                             " / ".join(f"{p:.2f}" for p in got["per_position_acceptance"]),
                             got["tokens_per_target_forward"], got["lossless"], got["seconds"]])  # fmt: skip
        bench_common.print_table(
            ["drafter", "k", "acceptance", "mean accepted length", "per position", "tokens/target fwd", "lossless",
             "eval s"], rows,
            title=f"{len(prompts)} held-out prompts x {new_tokens} tokens; plain greedy took {greedy_s:.1f} s; "
            f"draft LM trained in {draft_seconds:.0f} s",
        )  # fmt: skip
        eagle3 = figures["EAGLE-3 head (optjob) k=3"]["mean_accepted_length"]
        print(f"\nmean accepted length at k=3: {eagle3} (goal >= 3.0); vs draft LM "
              f"{figures['draft LM, 2 layers k=3']['mean_accepted_length']}, floor "
              f"{figures['untrained head (floor) k=3']['mean_accepted_length']}")  # fmt: skip
        record.update(stage_seconds=stage_seconds, phases=phases, stage_metrics=metrics, figures=figures,
                      device=str(torch.device("cuda" if torch.cuda.is_available() else "cpu")))  # fmt: skip
        bench_common.save_result("speculative-quick" if opts.quick else "speculative", record, opts.json)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
