"""`pretrain train`, `pretrain eval`, `pretrain lm-eval`, `pretrain export hf`, `pretrain sample` and
`pretrain checkpoint consolidate`: the trainer's commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (resumes from the newest checkpoint in the run dir)",
                           description="Train with DeepSpeed; rerunning the same command resumes exactly.")
    train.add_argument("config", help="a train YAML, e.g. configs/train/tiny-gpt-cpu.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    train.add_argument("--nproc", type=int, default=1, help="local processes (data-parallel ranks), default 1")
    train.add_argument("--run-dir", type=Path, default=None, help="default: runs/<config name>")
    train.set_defaults(func=run_train)

    ev = sub.add_parser("eval", help="held-out loss/perplexity and few-shot accuracy of a checkpoint")
    ev.add_argument("path", help="a run dir (its newest complete checkpoint) or a checkpoint dir")
    ev.add_argument("--tokenizer", default=None, help="a .tiktoken file; default: the manifest's vocab_file, else tiktoken by name")
    ev.add_argument("--max-batches", type=int, default=20,
                    help="held-out micro-batches (of train.micro_batch_size windows) to score")
    ev.add_argument("--examples", type=int, default=50, help="examples per few-shot task")
    ev.add_argument("--shots", default="0,1,5", help="shot counts, comma-separated")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="windows or examples per forward pass (default: the run's train.micro_batch_size)")
    ev.add_argument("--device", default=None, help="torch device, e.g. cuda:1 or cpu (default: cuda when available)")
    ev.add_argument("--json", action="store_true", help="print JSON only")
    ev.set_defaults(func=run_eval)

    # lm-eval's own options follow: "+" as this parser's prefix keeps argparse from reading them.
    harness = sub.add_parser("lm-eval", add_help=False, prefix_chars="+",
                             help="lm-evaluation-harness on a checkpoint: pretrain lm-eval --model pretrain "
                                  "--model_args checkpoint=RUN_DIR --tasks ... (lm-eval's options; --help for them)")
    harness.add_argument("args", nargs=argparse.REMAINDER)
    harness.set_defaults(func=run_lm_eval)

    export = sub.add_parser("export", help="export a checkpoint to another format")
    esub = export.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    hf = esub.add_parser("hf", help="a Hugging Face transformers model directory with the run's tokenizer",
                         description="GPT2LMHeadModel, GPTNeoForCausalLM (alternating attention), a trust_remote_code "
                                     "model (decoder-only Switch), T5 / SwitchTransformers / Marian (encoder-decoders) "
                                     "or BertForPreTraining; written only when its logits equal the checkpoint's.")
    hf.add_argument("checkpoint", help="a run dir or checkpoint dir")
    hf.add_argument("out_dir", type=Path, help="a new (or empty) directory")
    hf.set_defaults(func=run_export_hf)

    sample = sub.add_parser("sample", help="generate text from a checkpoint (KV cache; the GPU when there is one)",
                            description="Continues --prompt (an encoder-decoder reads it as its input); stops after "
                                        "--max-new-tokens or at end-of-text. The generated text goes to stdout, "
                                        "timing to stderr.")
    sample.add_argument("checkpoint", help="a run dir (its newest complete checkpoint) or a checkpoint dir")
    sample.add_argument("--prompt", required=True, help="text; <extra_id_N> and <pad> are those tokens")
    sample.add_argument("--max-new-tokens", type=int, default=50)
    sample.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    sample.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=run_sample)

    ckpt = sub.add_parser("checkpoint", help="work with checkpoints")
    csub = ckpt.add_subparsers(dest="checkpoint_command", metavar="COMMAND", required=True)
    cons = csub.add_parser("consolidate", help="a sharded checkpoint as one fp32 safetensors file",
                           description="Joins every rank's weight fragments (any ZeRO stage, every expert-parallel "
                                       "rank) into one fp32 state dict, one tensor at a time.")
    cons.add_argument("checkpoint", help="a run dir (its newest complete checkpoint) or a checkpoint dir")
    cons.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    cons.set_defaults(func=run_consolidate)


def run_train(args) -> int:
    from cluster.configio import load_run_config
    from trainer.errors import TrainError
    from trainer.launch import launch, prepare_run_dir

    if args.nproc < 1:
        raise TrainError(f"--nproc {args.nproc}: must be at least 1")
    cfg = load_run_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    prepare_run_dir(cfg, run_dir, args.nproc)
    return launch(run_dir, args.nproc)


def run_eval(args) -> int:
    from trainer.eval import evaluate

    shots = tuple(int(s) for s in args.shots.split(","))
    result = evaluate(args.path, args.tokenizer, args.max_batches, args.examples, shots, batch_size=args.batch_size,
                      device=args.device)
    (Path(result["checkpoint"]) / "eval.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['checkpoint']}: held-out loss {result['heldout_loss']:.4f}, "
          f"perplexity {result['heldout_perplexity']:.1f} ({result['heldout_tokens']} tokens)")
    for task, accs in result.get("few_shot", {}).items():  # none for span corruption
        cells = "  ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())
        print(f"  {task:<16} {cells}  (n={result['few_shot_examples'][task]})")
    return 0


def run_lm_eval(args) -> int:
    from cluster.errors import ClusterError

    try:
        from trainer.harness import main
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ClusterError("lm-eval is not installed: pip install 'pretrain[eval]'") from None
    main(args.args)
    return 0


def run_export_hf(args) -> int:
    from trainer.export import export_hf

    out, class_name = export_hf(args.checkpoint, args.out_dir)
    print(f"wrote {out} (transformers {class_name} and the run's tokenizer; logits checked against the checkpoint)")
    return 0


def run_sample(args) -> int:
    import sys

    from trainer.sample import sample_checkpoint

    s = sample_checkpoint(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(f"{len(s.ids)} tokens in {s.seconds:.2f} s ({len(s.ids) / s.seconds:.1f} tokens/s, {s.device})",
          file=sys.stderr)
    print(s.text)
    return 0


def run_consolidate(args) -> int:
    from trainer.checkpoint import resolve
    from trainer.weight_shards import consolidate

    step_dir = resolve(args.checkpoint)
    out = consolidate(step_dir, args.out)
    print(f"wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB, fp32) from {step_dir}")
    return 0
