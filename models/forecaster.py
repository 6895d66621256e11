"""Next-step recurrent forecasters with an explicit, carried hidden state.

Shapes (``B`` devices, ``T`` steps, ``F`` features, ``L`` layers, ``H`` hidden units):

* ``x``: ``(B, F)`` for :meth:`Forecaster.step`, ``(B, T, F)`` for :meth:`Forecaster.forward`;
* state: a tuple of tensors each ``(L, B, H)`` — ``(h, c)`` for an LSTM, ``(h,)`` for a GRU —
  the same layout as :class:`torch.nn.LSTM` whatever ``batch_first`` says;
* output: the forecast of the *next* step's features, ``(B, F)`` or ``(B, T, F)``.

``step`` and ``forward`` share the same ``nn.LSTM``/``nn.GRU`` module, so advancing one step at a time
with carried state gives the outputs of the whole sequence at once (a unit test pins this to 1e-5).
Both are causal: the output at ``t`` depends on inputs up to ``t`` only.

Example::

    >>> import torch
    >>> m = Forecaster(ForecasterConfig(n_features=3, hidden=8, layers=2)).eval()
    >>> s = m.init_state(4)
    >>> y, s = m.step(torch.zeros(4, 3), s)
    >>> tuple(y.shape), tuple(s[0].shape)
    ((4, 3), (2, 4, 8))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

State = tuple[torch.Tensor, ...]
CellKind = Literal["lstm", "gru"]


@dataclass(frozen=True)
class ForecasterConfig:
    n_features: int
    hidden: int = 64
    layers: int = 2
    dropout: float = 0.1
    cell: CellKind = "lstm"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class Forecaster(nn.Module):
    """Stacked LSTM (or GRU) with a linear head forecasting the next step's features.

    The head predicts a residual (``x_{t+1} - x_t``) added to the input, which makes a persistence
    forecast the starting point and trains faster on slowly varying sensor signals.
    """

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        self.config = config
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.rnn = rnn_cls(
            input_size=config.n_features,
            hidden_size=config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden, config.n_features)

    @property
    def n_state(self) -> int:
        """Number of state tensors: 2 for an LSTM (h, c), 1 for a GRU (h)."""
        return 2 if self.config.cell == "lstm" else 1

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.layers, batch, self.config.hidden)
        return tuple(torch.zeros(shape, device=device) for _ in range(self.n_state))

    def _rnn(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
        if state is None:
            hx = None
        elif self.config.cell == "lstm":
            hx = (state[0], state[1])
        else:
            hx = state[0]
        out, new = self.rnn(x, hx)
        return out, (tuple(new) if isinstance(new, tuple) else (new,))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Forecasts for every step of ``x`` ``(B, T, F)``; returns ``(B, T, F)`` and the final state."""
        out, new = self._rnn(x, state)
        return x + self.head(out), new

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Advance ``B`` independent sequences by one step: ``x`` ``(B, F)`` -> forecast ``(B, F)``.

        The cell equations are written out with the ``nn.LSTM``/``nn.GRU`` weights rather than calling
        the fused RNN kernel, whose set-up cost dominates a single step (about 10x slower at small B).
        LSTM, per layer: ``i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh)``;
        ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``; ``h' = sigmoid(o) * tanh(c')``.
        GRU: ``r, z = sigmoid(...)``; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``;
        ``h' = (1 - z) * n + z * h``. Dropout between layers is a training-time effect only.
        """
        inp = x
        hs, cs = [], []
        for layer in range(self.config.layers):
            w_ih = getattr(self.rnn, f"weight_ih_l{layer}")
            w_hh = getattr(self.rnn, f"weight_hh_l{layer}")
            b_ih = getattr(self.rnn, f"bias_ih_l{layer}")
            b_hh = getattr(self.rnn, f"bias_hh_l{layer}")
            h = state[0][layer]
            if self.config.cell == "lstm":
                gates = torch.addmm(b_ih, inp, w_ih.t()) + torch.addmm(b_hh, h, w_hh.t())
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * state[1][layer] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                cs.append(c)
            else:
                gi = torch.addmm(b_ih, inp, w_ih.t())
                gh = torch.addmm(b_hh, h, w_hh.t())
                i_r, i_z, i_n = gi.chunk(3, dim=1)
                h_r, h_z, h_n = gh.chunk(3, dim=1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
            hs.append(h)
            inp = h
        new = (torch.stack(hs), torch.stack(cs)) if cs else (torch.stack(hs),)
        return x + self.head(inp), new
