"""AWD-LSTM language model (Merity et al. 2017) built on trainer.regularizers."""

from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.regularizers import (
    LockedDropout,
    WeightDropLSTM,
    activation_regularization,
    embedding_dropout,
    temporal_activation_regularization,
)

Hidden = List[Tuple[Tensor, Tensor]]


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

    def forward(self, tokens: Tensor, hidden: Hidden | None = None) -> AWDOutput:
        if hidden is None:
            hidden = self.init_hidden(tokens.size(1))
        emb = embedding_dropout(self.encoder, tokens, self.dropoute, self.training)
        x = self.lockdrop(emb, self.dropouti)
        new_hidden: Hidden = []
        for l, rnn in enumerate(self.rnns):
            x, h = rnn(x, hidden[l])
            new_hidden.append(h)
            if l != self.nlayers - 1:
                x = self.lockdrop(x, self.dropouth)
        raw_output = x
        output = self.lockdrop(raw_output, self.dropout)
        return AWDOutput(output, new_hidden, raw_output)

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
