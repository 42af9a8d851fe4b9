"""Small random transformers GPT-2 models shared by the engine tests."""
import torch
import transformers

transformers.logging.set_verbosity_error()


def tiny_hf_model(*, vocab_size=101, n_embd=48, n_layer=2, n_head=3, n_positions=64, seed=0, init=0.2):
    """A random GPT2LMHeadModel in eval mode. A wide initializer keeps greedy continuations varied
    (GPT-2's own 0.02 makes a random model repeat one token)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                     n_positions=n_positions, initializer_range=init)
    return transformers.GPT2LMHeadModel(config).eval()


def left_padded_batch(lengths, vocab_size, pad_id=0):
    """Random prompts of the given lengths, left-padded into [B, max(lengths)] with their mask."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(0, vocab_size, (length,))
        mask[row, width - length:] = 1
    return ids, mask
