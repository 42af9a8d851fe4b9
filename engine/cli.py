"""The `gpt2-engine` command: bench, generate, kernels."""
from __future__ import annotations

import argparse
import sys


def _generate(args) -> int:
    import torch

    from engine.api import GPT2
    from engine.config import PRESETS

    if args.random_weights:
        if args.model not in PRESETS:
            raise SystemExit(f"--random-weights needs a preset model name ({', '.join(PRESETS)}), got {args.model!r}")
        model = GPT2.from_config(args.model, seed=args.seed, device=args.device, backend=args.backend,
                                 quantization=args.quantization)
    else:
        model = GPT2.from_pretrained(args.model, device=args.device, backend=args.backend, quantization=args.quantization)
    if args.tokenizer:
        from engine.tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0 or args.top_k > 0 or args.top_p < 1.0,
               "seed": args.seed}
    if options["do_sample"]:
        options.update(temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p)
    if args.stream:
        sys.stdout.write(args.prompt)
        for piece in model.stream(args.prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(args.prompt + model.generate_text(args.prompt, **options)[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2-engine", description="GPT-2 inference on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    from engine import bench

    bench_parser = sub.add_parser("bench", help="tokens/s of the engine vs the eager baseline and transformers",
                                  description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bench_parser)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", default="gpt2", help="checkpoint directory or hub id (or a preset with --random-weights)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampler (and of --random-weights)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "eager"], help="default: triton on CUDA, torch on CPU")
    gen.add_argument("--tokenizer", default=None, help="directory with encoder.json+vocab.bpe, vocab.json+merges.txt or tokenizer.json")
    gen.add_argument("--quantization", choices=["int8"], default=None, help="int8 weight-only quantization (default: none)")
    gen.add_argument("--random-weights", action="store_true", help="seeded random weights of a preset shape (no checkpoint)")

    kern = sub.add_parser("kernels", help="ahead-of-time compile report of every kernel for sm_80 and sm_90")
    kern.add_argument("--filter", default="", help="only configurations whose label contains this text")
    kern.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            from engine import bench

            return bench.main(args)
        if args.command == "generate":
            return _generate(args)
        from kernels import compile_report

        return compile_report.main(["--filter", args.filter] + (["--json", args.json] if args.json else []))
    except (FileNotFoundError, ValueError, TypeError) as exc:  # bad input: the message says what is wrong
        print(f"gpt2-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
