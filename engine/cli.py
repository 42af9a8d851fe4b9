"""The `gpt2-engine` command: bench (and `bench serve`, the serving load generator), generate, serve, kernels.

Every bad argument or input ends the command with one line on stderr, `gpt2-engine <command>: error:
<what is wrong>`, and exit status 2: argparse's own errors (printed on one line by `Parser`), the
shared argument types (`gpt2_engine.cli_args`), and the ValueError / TypeError / FileNotFoundError
that the API raises for bad options, checkpoints and prompts. The generation options go through the
public API (`GPT2.generate_text` / `GPT2.stream`, transformers-style keyword arguments), which
validates them; the CLI checks only what the API cannot know (which flags the user typed).
"""
from __future__ import annotations

import argparse
import sys

from gpt2_engine.cli_args import Parser, add_device_argument, draft_model, int_at_least

# generate's sampling flags: transformers ignores them when decoding greedily, so without --do-sample
# (and unless --temperature is 0, which means greedy) they are an error instead of a silent no-op.
SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def _add_generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--model", default="gpt2", help="checkpoint directory or hub id (or a preset with --random-weights)")
    gen.add_argument("--prompt", default=None, help="the prompt text (default: read from stdin, less one trailing newline)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    gen.add_argument("--do-sample", action="store_true", help="sample (default: greedy decoding, as in transformers)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default 1.0); 0 means greedy decoding, even with --do-sample "
                          "(--top-k and --top-p are then unused)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default 50; 0 = off)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="transformers' repetition penalty (default 1.0 = off)")
    gen.add_argument("--num-return-sequences", type=int, default=None, help="continuations of the prompt (default 1; more need --do-sample)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the sampler (default: unseeded) and of --random-weights (default 0)")
    gen.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams (default 1 = off)")
    gen.add_argument("--batch-invariant", action="store_true",
                     help="logits bitwise independent of the rest of the batch (fixed-shape kernels; slower)")
    gen.add_argument("--sync-scheduling", action="store_true",
                     help="no async scheduling (the next step is prepared only after this one's tokens are back)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_device_argument(gen)
    gen.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    gen.add_argument("--backend", default="auto", help="auto, triton, torch or eager (auto: triton on CUDA, torch on CPU)")
    gen.add_argument("--tokenizer", default=None,
                     help="directory with encoder.json+vocab.bpe, vocab.json+merges.txt or tokenizer.json (default: the "
                          "checkpoint's, else GPT-2's BPE shipped with gpt2-engine)")
    gen.add_argument("--quantization", choices=["int8", "w8a8"], default=None,
                     help="int8: int8 weights; w8a8: int8 weights and activations, integer dot products (CPU, torch "
                          "backend) (default: none)")
    gen.add_argument("--decode-kernel", choices=["graphs", "persistent"], default="graphs",
                     help="decode step on the triton backend: graphs (multi-launch, CUDA graphs; default) or persistent (one launch for "
                        "decode-only steps of <= 16 rows; opt-in until verified on a GPU)")
    gen.add_argument("--random-weights", action="store_true", help="seeded random weights of a preset shape (no checkpoint)")
    gen.add_argument("--assistant-model", default=None,
                     help="assisted generation: draft with this model (checkpoint, hub id, or a preset with --random-weights: "
                          "seed + 1) or 'int8', the model's own int8 twin; greedy output is unchanged")
    gen.add_argument("--num-assistant-tokens", type=int_at_least(1), default=None,
                     help="tokens the assistant drafts per step (default 20, transformers')")
    gen.add_argument("--prompt-lookup", type=int_at_least(1), default=None, metavar="K",
                     help="assisted generation without a draft model: draft K tokens by n-gram lookup in the prompt and output")


def _generation_options(args) -> dict:
    """The API's keyword arguments for the flags given; a flag left out keeps the API's default."""
    options = {"max_new_tokens": args.max_new_tokens}
    for name in ("repetition_penalty", "num_return_sequences", "num_beams", "seed"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.num_assistant_tokens is not None:
        if args.assistant_model is None:
            raise ValueError("--num-assistant-tokens needs --assistant-model")
        options["num_assistant_tokens"] = args.num_assistant_tokens
    if args.prompt_lookup is not None:
        options["prompt_lookup_num_tokens"] = args.prompt_lookup
    if args.temperature == 0:  # OpenAI's and vLLM's convention: temperature 0 is greedy decoding
        return options
    warpers = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if warpers and not args.do_sample:
        flags = " ".join(f"{SAMPLING_FLAGS[name]} {value}" for name, value in warpers.items())
        verb = "applies" if len(warpers) == 1 else "apply"
        raise ValueError(f"{flags} {verb} only when sampling: add --do-sample (or use --temperature 0 for greedy decoding)")
    return options | warpers | {"do_sample": args.do_sample}


def _check_model_flags(args) -> None:
    from gpt2_engine.config import PRESETS

    if args.random_weights and args.model not in PRESETS:
        raise ValueError(f"--random-weights needs a preset --model ({', '.join(PRESETS)}), got {args.model!r}")


def _build_model(args):
    from gpt2_engine.api import GPT2

    runtime = {"device": args.device, "dtype": args.dtype, "backend": args.backend, "quantization": args.quantization,
               "decode_kernel": args.decode_kernel}
    if args.batch_invariant:
        runtime["batch_invariant"] = True
    if args.sync_scheduling:
        runtime["async_scheduling"] = False
    if not args.random_weights:
        return GPT2.from_pretrained(args.model, **runtime)
    return GPT2.from_config(args.model, **({} if args.seed is None else {"seed": args.seed}), **runtime)


def _generate(args) -> int:
    from gpt2_engine.tokenizer import load_tokenizer

    options = _generation_options(args)
    _check_model_flags(args)
    tokenizer = None
    if args.tokenizer is not None:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"--tokenizer: {exc}") from exc
    prompt = args.prompt if args.prompt is not None else _read_stdin_prompt()
    model = _build_model(args)
    if args.assistant_model is not None:
        options["assistant_model"] = draft_model(args.assistant_model, random_weights=args.random_weights, seed=args.seed,
                                                 runtime={"device": model.device, "dtype": model.dtype,
                                                          "backend": model.backend})
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if args.stream:
        if options.get("num_beams", 1) > 1:
            raise ValueError("--stream cannot show beam search (--num-beams > 1): the best beam is known only at the end")
        pieces = model.stream(prompt, **options)  # options are checked here, before anything is printed
        sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        texts = model.generate_text(prompt, **options)
        for i, text in enumerate(texts):
            if len(texts) > 1:     # the sequences may span lines: each gets a header line
                print(f"--- sequence {i + 1} of {len(texts)} ---")
            print(prompt + text)
    return 0


def _read_stdin_prompt() -> str:
    if sys.stdin.isatty():
        print("gpt2-engine generate: reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read().removesuffix("\n")  # the newline that echo and a typed line end with


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gpt2-engine", description="GPT-2 inference on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    from gpt2_engine.bench import decode as bench

    bench_parser = sub.add_parser("bench", help="tokens/s of the engine vs the eager baseline and transformers",
                                  description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bench_parser)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    _add_generate_arguments(gen)

    from gpt2_engine.server import serve

    serve_parser = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching; Ray Serve replicas)",
                                  description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(serve_parser)

    kern = sub.add_parser("kernels", help="ahead-of-time compile report of every kernel for sm_80 and sm_90")
    kern.add_argument("--filter", default="", help="only configurations whose label contains this text")
    kern.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    kern.add_argument("--plan", action="store_true", help="print the decode launch plan (tiles, split, programs) instead")
    kern.add_argument("--sms", type=int, default=132, help="SM count the --plan is made for (default 132)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        build_parser().print_help(sys.stderr)
        return 2
    try:
        return _main(argv)
    except KeyboardInterrupt:      # Ctrl-C: the command stops (a server after its drain) without a traceback
        print(file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    try:
        if argv[:2] == ["bench", "serve"]:   # the serving load generator has its own flags
            from gpt2_engine.bench import serve as bench_serve

            return bench_serve.main(argv[2:])
        args, unknown = build_parser().parse_known_args(argv)
    except SystemExit as exit_:  # --help (0), or a usage error already printed on one line (2)
        return exit_.code
    try:
        if unknown:  # reported here, not by the top-level parser, to name the subcommand
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command == "bench":
            from gpt2_engine.bench import decode as bench

            return bench.main(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from gpt2_engine.server import serve

            return serve.main(args)
        from gpt2_engine import cli_kernels

        if args.plan:
            return cli_kernels.plan_main(args.sms, args.json)
        return cli_kernels.compile_report_main(args.filter, args.json)
    except (FileNotFoundError, ValueError, TypeError) as exc:  # bad input: the message says what is wrong
        print(f"gpt2-engine {args.command}: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
