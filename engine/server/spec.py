"""What a process needs to build one engine and its app (`gpt2-engine serve`, and each Ray Serve
replica, which receives it), and the building."""
from __future__ import annotations


def model_spec(args) -> dict:
    """What a process needs to build the model and app (sent to each Ray replica)."""
    return {name: getattr(args, name) for name in ("model", "random_weights", "seed", "tokenizer", "served_model_name",
                                                   "api_key", "max_num_seqs", "max_queue", "max_body_size", "device", "dtype", "backend",
                                                   "quantization", "batch_invariant", "sync_scheduling", "decode_kernel", "speculative_model",
                                                   "speculative_ngram", "num_speculative_tokens")}


def check_spec(spec: dict) -> None:
    """What can be checked of the spec without building the model: the preset or the checkpoint's
    config (FileNotFoundError / ValueError saying what is wrong)."""
    from gpt2_engine.config import PRESETS
    from gpt2_engine.weights import load_config

    if spec["random_weights"]:
        if spec["model"] not in PRESETS:
            raise ValueError(f"--random-weights needs a preset model name ({', '.join(PRESETS)}), got {spec['model']!r}")
    else:
        load_config(spec["model"])


def build_from_spec(spec: dict):
    """The FastAPI app of one engine built from model_spec()."""
    from gpt2_engine.api import GPT2
    from gpt2_engine.server.app import build_app

    runtime = dict(device=spec["device"], dtype=spec["dtype"], backend=spec["backend"], quantization=spec["quantization"],
                   max_num_seqs=spec["max_num_seqs"],
                   batch_invariant=spec["batch_invariant"], async_scheduling=False if spec["sync_scheduling"] else None,
                   decode_kernel=spec["decode_kernel"])
    check_spec(spec)
    runtime.update(_speculative(spec, runtime))
    if spec["random_weights"]:
        model = GPT2.from_config(spec["model"], seed=spec["seed"], **runtime)
    else:
        model = GPT2.from_pretrained(spec["model"], **runtime)
    if spec["tokenizer"]:
        from gpt2_engine.tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(spec["tokenizer"])
    model.tokenizer   # load it now: a missing tokenizer is a startup error, not a failed request
    return build_app(model, served_model_name=spec["served_model_name"] or spec["model"], api_key=spec["api_key"],
                     max_queue=spec["max_queue"], max_body_size=spec["max_body_size"])


def _speculative(spec: dict, runtime: dict) -> dict:
    """The model's speculative decoding options from the --speculative-* flags (vLLM's names)."""
    from gpt2_engine.cli_args import draft_model

    if spec["speculative_model"] is not None and spec["speculative_ngram"]:
        raise ValueError("pass --speculative-model or --speculative-ngram, not both")
    if spec["speculative_ngram"]:
        return {"speculative_model": "ngram", "num_speculative_tokens": spec["num_speculative_tokens"]}
    if spec["speculative_model"] is None:
        if spec["num_speculative_tokens"] is not None:
            raise ValueError("--num-speculative-tokens needs --speculative-model or --speculative-ngram")
        return {}
    draft = draft_model(spec["speculative_model"], random_weights=spec["random_weights"], seed=spec["seed"],
                        runtime={name: runtime[name] for name in ("device", "dtype", "backend")})
    return {"speculative_model": draft, "num_speculative_tokens": spec["num_speculative_tokens"]}
