"""AWD-LSTM language model (Merity et al. 2017) built on recipes.awd_lstm.regularizers."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.awd_lstm.regularizers import (
    LockedDropout,
    WeightDropLSTM,
    activation_regularization,
    embedding_dropout,
    embedding_mask,
    temporal_activation_regularization,
)

Hidden = List[Tuple[Tensor, Tensor]]


class AWDMasks(NamedTuple):
    """Every dropout mask of one training forward over a whole batch (None where a rate is 0).

    Drawn once per optimizer step for the global batch, so a rank or micro-batch that sees some of the
    batch's columns takes the same word, unit and weight masks as a single process seeing all of them.
    """

    embedding: Optional[Tensor]  # (ntoken, 1): word types kept
    layer_inputs: List[Optional[Tensor]]  # (1, B, width) locked masks on each layer's input
    output: Optional[Tensor]  # (1, B, emsize) on the last layer's output
    weight_hh: List[Optional[Tensor]]  # DropConnect on each layer's recurrent weights

    def columns(self, cols: slice) -> "AWDMasks":
        """The masks of the batch columns ``cols`` (the word and weight masks are the whole batch's)."""
        cut = [None if m is None else m[:, cols] for m in self.layer_inputs]
        return self._replace(layer_inputs=cut, output=None if self.output is None else self.output[:, cols])


class AWDOutput(NamedTuple):
    """Undecoded outputs, so the caller can decode/score in chunks."""

    output: Tensor  # dropped last-layer output (T, B, E)
    hidden: Hidden  # new (h, c) per layer, each (1, B, H_l)
    raw_output: Tensor  # last-layer output before its dropout (for TAR)


class AWDLSTM(nn.Module):
    """Stacked weight-dropped LSTM LM with tied embeddings.

    Dropout rates are plain float attributes read at every forward so a
    schedule can change them between steps; ``wdrop`` writes through to every
    layer's ``weight_drop``.
    """

    def __init__(
        self,
        ntoken: int,
        emsize: int = 400,
        nhid: int = 1150,
        nlayers: int = 3,
        dropout: float = 0.4,
        dropouth: float = 0.25,
        dropouti: float = 0.4,
        dropoute: float = 0.1,
        wdrop: float = 0.5,
        tie_weights: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        self.ntoken = ntoken
        self.emsize = emsize
        self.nhid = nhid
        self.nlayers = nlayers
        self.tie_weights = tie_weights
        self.dropout = dropout
        self.dropouth = dropouth
        self.dropouti = dropouti
        self.dropoute = dropoute

        self.lockdrop = LockedDropout()
        self.encoder = nn.Embedding(ntoken, emsize)
        # Tying needs the last layer to emit embedding-sized vectors.
        out_size = emsize if tie_weights else nhid
        self.rnns = nn.ModuleList(
            WeightDropLSTM(
                emsize if l == 0 else nhid,
                out_size if l == nlayers - 1 else nhid,
                weight_drop=wdrop,
            )
            for l in range(nlayers)
        )
        self.decoder = nn.Linear(out_size, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self._wdrop = float(wdrop)

    @property
    def wdrop(self) -> float:
        return self._wdrop

    @wdrop.setter
    def wdrop(self, value: float) -> None:
        self._wdrop = float(value)
        for rnn in self.rnns:
            rnn.weight_drop = self._wdrop

    def forward(self, tokens: Tensor, hidden: Hidden | None = None, masks: AWDMasks | None = None) -> AWDOutput:
        """``masks`` (from ``draw_masks``, cut to this batch's columns) replaces the masks a training forward would
        otherwise draw from the global generator for its own columns."""
        if hidden is None:
            hidden = self.init_hidden(tokens.size(1))
        drawn = masks is not None and self.training
        emb = embedding_dropout(self.encoder, tokens, self.dropoute, self.training,
                                masks.embedding if drawn else None)
        new_hidden: Hidden = []
        x = emb
        for l, rnn in enumerate(self.rnns):
            x = self.lockdrop(x, self._input_rate(l), masks.layer_inputs[l] if drawn else None)
            x, h = rnn(x, hidden[l], mask=masks.weight_hh[l] if drawn else None)
            new_hidden.append(h)
        raw_output = x
        output = self.lockdrop(raw_output, self.dropout, masks.output if drawn else None)
        return AWDOutput(output, new_hidden, raw_output)

    def _input_rate(self, layer: int) -> float:
        return self.dropouti if layer == 0 else self.dropouth

    def draw_masks(self, batch_size: int, generator: torch.Generator) -> AWDMasks:
        """One training forward's masks for a batch of ``batch_size`` columns, drawn from ``generator`` in a fixed
        order, at the rates set now. Draw the next set only after the backward of every forward using this one
        (the recurrent-weight masks live in buffers that the next draw overwrites)."""
        w = self.encoder.weight
        opts = dict(dtype=w.dtype, device=w.device, generator=generator)
        embedding = embedding_mask(w.size(0), self.dropoute, **opts)
        inputs, weights = [], []
        for l, rnn in enumerate(self.rnns):
            inputs.append(LockedDropout.draw_mask(batch_size, rnn.input_size, self._input_rate(l), **opts))
            weights.append(rnn.draw_mask(generator=generator))
        output = LockedDropout.draw_mask(batch_size, self.rnns[-1].hidden_size, self.dropout, **opts)
        return AWDMasks(embedding, inputs, output, weights)

    def init_hidden(self, batch_size: int) -> Hidden:
        w = self.encoder.weight
        return [
            (
                w.new_zeros(1, batch_size, rnn.hidden_size),
                w.new_zeros(1, batch_size, rnn.hidden_size),
            )
            for rnn in self.rnns
        ]

    @staticmethod
    def detach_hidden(hidden: Hidden) -> Hidden:
        """Cut the graph between BPTT windows while keeping the state values."""
        return [(h.detach(), c.detach()) for h, c in hidden]

    def _logits(self, out: AWDOutput) -> Tensor:
        # Softmax over a large vocab in bf16 is too lossy; score in fp32.
        return self.decoder(out.output).float().reshape(-1, self.ntoken)

    def loss(
        self, out: AWDOutput, targets: Tensor, alpha: float, beta: float
    ) -> Tuple[Tensor, Tensor]:
        """Return (CE + AR + TAR for backward, detached mean CE for logging)."""
        ce = F.cross_entropy(self._logits(out), targets.reshape(-1))
        total = (
            ce
            + activation_regularization(out.output, alpha).float()
            + temporal_activation_regularization(out.raw_output, beta).float()
        )
        return total, ce.detach()

    def token_nll_sum(self, out: AWDOutput, targets: Tensor) -> Tensor:
        """Summed NLL in float64 so per-chunk sums add up exactly over an eval set."""
        nll = F.cross_entropy(self._logits(out), targets.reshape(-1), reduction="none")
        return nll.double().sum()
