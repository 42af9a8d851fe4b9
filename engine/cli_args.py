"""Argument helpers shared by the `gpt2-engine` subcommands (generate, serve, bench, bench serve): a parser
whose usage errors are one line with exit status 2, and argument types checked at parse time."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse's parser, with its usage errors on one line (`--help` shows the usage), and no
    abbreviated flags (a typo such as --max-new-token is an error, not --max-new-tokens)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def device_argument(value: str) -> str:
    """argparse type of --device: the API's rule (cpu, cuda or cuda:N, where this machine has it)."""
    from gpt2_engine.api import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """--device, checked when the arguments are parsed (shared by the subcommands that run a model)."""
    parser.add_argument("--device", type=device_argument, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (else argparse's one-line error, exit 2)."""
    return int_in_range(minimum, None)


def int_in_range(minimum: int, maximum: int | None):
    """An argparse type: an integer in [minimum, maximum] (no maximum when None)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    parse.__name__ = "integer"      # argparse names the type in "invalid integer value"
    return parse


def draft_model(value: str, *, random_weights: bool, seed: int | None, runtime: dict):
    """A draft model named on the command line (--assistant-model, --speculative-model): "int8" (the
    model's own int8 twin, passed on as is), a checkpoint directory or hub id, or with
    --random-weights a preset of seeded random weights, seed + 1 (another model than the target)."""
    from gpt2_engine.api import GPT2
    from gpt2_engine.config import PRESETS

    if value == "int8":
        return value
    # only its weights draft (on the target's own pool): its engine gets the smallest pool
    runtime = dict(runtime, num_blocks=1)
    if random_weights:
        if value not in PRESETS:
            raise ValueError(f"with --random-weights the draft model must be 'int8' or a preset ({', '.join(PRESETS)}), "
                             f"got {value!r}")
        return GPT2.from_config(value, seed=(seed or 0) + 1, **runtime)
    return GPT2.from_pretrained(value, **runtime)
