"""The continuous cache pointer (Grave et al. 2017) as evaluated in the AWD-LSTM paper, batched.

For each position the last layer's hidden state attends (softmax of ``theta`` times dot products) over
the hidden states of the previous ``window`` positions; the attention mass on keys whose next word is the
target is the pointer probability, mixed with the softmax as ``lambdah * ptr + (1 - lambdah) * vocab``.

The reference implementation loops over tokens in Python. Here a whole chunk of positions attends at once
through a banded causal mask, and only the target's probability is formed, never a vocabulary-sized
pointer distribution. With ``skip_until_full`` the pointer is used exactly where the reference uses it:
where the retained history plus the offset in the chunk exceeds the window.
"""

from __future__ import annotations

import torch

from .corpus import get_batch
from .model import AWDLSTM


@torch.no_grad()
def pointer_nll_sum(model: AWDLSTM, source: torch.Tensor, chunk: int, window: int, theta: float, lambdah: float,
                    skip_until_full: bool = True) -> tuple[float, int]:
    """Summed NLL (float64) and token count over ``source`` (time-major, one independent stream per column)."""
    nll = torch.zeros((), dtype=torch.float64, device=source.device)
    ncols = source.size(1)
    hidden = model.init_hidden(ncols)
    keys = source.new_zeros((0, ncols, model.decoder.in_features), dtype=torch.float32)
    values = source.new_zeros((0, ncols))
    tokens = 0
    for i in range(0, source.size(0) - 1, chunk):
        inputs, targets = get_batch(source, i, chunk)
        out = model(inputs, hidden)
        hidden = out.hidden
        steps = targets.size(0)
        logits = model.decoder(out.output).float()  # (T, B, V)
        vocab_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        del logits

        query = out.raw_output.float()  # (T, B, H)
        kept = keys.size(0)
        all_keys = torch.cat([keys, query])  # history then this chunk: (L+T, B, H)
        all_values = torch.cat([values, targets])  # the word that followed each key: (L+T, B)
        scores = torch.einsum("tbh,kbh->btk", query, all_keys) * theta  # (B, T, L+T)
        t = torch.arange(steps, device=source.device).unsqueeze(1)
        k = torch.arange(kept + steps, device=source.device).unsqueeze(0)
        allowed = (k < kept + t) & (k >= kept + t - window)  # the previous `window` positions
        scores.masked_fill_(~allowed, float("-inf"))
        has_keys = allowed.any(-1)  # (T, L+T) -> (T,)
        attn = torch.softmax(scores.masked_fill(~has_keys.view(1, -1, 1), 0.0), -1)
        hit = all_values.t().unsqueeze(1) == targets.t().unsqueeze(-1)  # (B, T, L+T)
        ptr = (attn * hit).sum(-1).t()  # (T, B)

        use = (kept + t.squeeze(1) > window) if skip_until_full else has_keys
        vocab_logp = vocab_logp.double()
        mixed = torch.log(lambdah * ptr.double() + (1.0 - lambdah) * vocab_logp.exp())
        token_logp = torch.where(use.unsqueeze(1), mixed, vocab_logp)
        nll -= token_logp.sum()
        tokens += targets.numel()

        keys = all_keys[-window:]
        values = all_values[-window:]
    return nll.item(), tokens
