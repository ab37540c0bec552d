"""Negative controls the image and audio validation tests share (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import numpy as np

from gemma4_compile.runners.ort import OrtRunner


class PlaceholderPLE(OrtRunner):
    """Negative control: PLE token identity looked up with the placeholder ids instead of pad (tiny tables
    have 512 rows, so the placeholder id wraps into the table)."""

    placeholder = "image_token_id"

    def _run(self, state, input_ids, seq_len, rows=None):
        token = getattr(self, self.placeholder)
        raw = np.where(input_ids == token, token % self.spec.vocab_size, input_ids)
        feeds = {"input_ids": raw, **self._no_rows}
        if self.rows is not None:  # the tables are fed by row (runners/rows.py)
            feeds.update(self.rows.feeds(raw))
        ple = self.sessions["embed"].run(["per_layer_tokens"], feeds)[0]
        original = self.sessions["embed"].run

        def run(names, feeds):
            out = original(names, feeds)
            return [ple if n == "per_layer_tokens" else o for n, o in zip(names, out)]

        self.sessions["embed"].run = run
        try:
            return super()._run(state, input_ids, seq_len, rows)
        finally:
            del self.sessions["embed"].run
