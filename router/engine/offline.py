"""The in-process engine: the public Python API and the reference for every distributed path.

engine = Engine.from_pretrained(path, dtype="float32")
engine.logits([[1, 2, 3], [4, 5]])          # one [len_i, vocab] float32 tensor per sequence
engine.generate([[1, 2, 3]], max_tokens=16)  # the new tokens of each sequence (KV cache)
engine.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from emoe.placement import Placement
from emoe.spec import ModelSpec
from router.dispatch import DispatchContext, Dispatcher, get_dispatcher
from router.engine.sampling import SamplingParams, SequenceSampling, sample, stop_token_set
from router.model import RouterModel, Segment, Segments, SequenceCache, load_router_model, parse_dtype


class Engine:
    """The engine over an already-built dispatcher; `from_pretrained` builds one from a checkpoint."""

    def __init__(self, spec: ModelSpec, model: RouterModel, dispatcher: Dispatcher):
        self.spec, self.model, self.dispatcher = spec, model, dispatcher
        self._loop = asyncio.new_event_loop()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        dispatcher: str = "local",
        num_groups: int = 1,
        device: str = "cpu",
        **dispatcher_options: Any,
    ) -> Engine:
        """Loads the router half of the checkpoint at `path` and its experts as `num_groups` expert groups.

        `dispatcher`: "local" keeps the groups in this process (the reference implementation); "grpc" and
        "dist" start one Ray actor per group in the current Ray cluster (started on demand) and reach them
        over gRPC or torch.distributed. `engine.close()` shuts those actors down.
        """
        torch_dtype, dev = parse_dtype(dtype), torch.device(device)
        factory = get_dispatcher(dispatcher)
        spec, model = load_router_model(path, torch_dtype, dev)
        placement = Placement.contiguous(spec.moe_layer_ids, spec.num_experts, num_groups)
        ctx = DispatchContext(Path(path), spec, torch_dtype, dev, placement, dict(dispatcher_options))
        return cls(spec, model, factory(ctx))

    # ---- public API ----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_id_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Logits at every position: one float32 tensor [len_i, vocab] per sequence."""
        seqs = self._check_tokens(token_id_lists)
        caches = [SequenceCache(self.spec.num_layers, len(s)) for s in seqs]
        h = self._run(self._forward(seqs, caches))
        logits = self.model.logits(h)
        return list(logits.split([len(s) for s in seqs]))

    @torch.inference_mode()
    def generate(
        self,
        token_id_lists: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        **sampling: Any,
    ) -> list[list[int]]:
        """The new tokens of each sequence: greedy when temperature is 0, else sampled (seeded per sequence).
        `sampling` takes the other `SamplingParams` fields (penalties, min_p, min_tokens, logit_bias).

        A sequence stops after `max_tokens`, or at an end-of-sequence token (the model's eos ids, unless
        `ignore_eos`, plus `stop_token_ids`), which is included in its output.
        """
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=ignore_eos,
            **sampling,
        )
        seqs = self._check_tokens(token_id_lists)
        stops = stop_token_set(params, self.spec.eos_token_ids)
        outputs: list[list[int]] = [[] for _ in seqs]
        samplers = [
            SequenceSampling(params, stops, s, outputs[i], seed=None if seed is None else seed + i)
            for i, s in enumerate(seqs)
        ]
        caches = [SequenceCache(self.spec.num_layers, len(s) + max_tokens) for s in seqs]
        active = list(range(len(seqs)))
        step_tokens = seqs
        while active:
            h = self._run(self._forward(step_tokens, [caches[i] for i in active], last_only=True))
            logits = self.model.logits(h)  # [B, V]
            still = []
            toks, _ = sample(logits, [samplers[i] for i in active])
            for tok, i in zip(toks, active, strict=True):
                outputs[i].append(tok)
                if tok not in stops and len(outputs[i]) < max_tokens:
                    still.append(i)
            active = still
            step_tokens = [[outputs[i][-1]] for i in active]
        return outputs

    def close(self) -> None:
        """Releases the expert groups (remote ones are shut down) and the engine's event loop."""
        if self._loop.is_closed():
            return

        async def _close() -> None:
            self.dispatcher.close()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.wait(pending, timeout=5)

        self._run(_close())
        self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -----------------------------------------------------------------------------
    def _check_tokens(self, token_id_lists: Sequence[Sequence[int]]) -> list[list[int]]:
        if not token_id_lists:
            raise ValueError("token_id_lists is empty")
        vocab = self.spec.vocab_size
        out = []
        for i, seq in enumerate(token_id_lists):
            seq = [int(t) for t in seq]
            if not seq:
                raise ValueError(f"token_id_lists[{i}] is empty")
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"token_id_lists[{i}] has token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                )
            out.append(seq)
        return out

    async def _forward(
        self, seqs: list[list[int]], caches: list[SequenceCache], last_only: bool = False
    ) -> torch.Tensor:
        segments, start = Segments(), 0
        for seq, cache in zip(seqs, caches, strict=True):
            segments.append(Segment(cache, start, len(seq), cache.length))
            start += len(seq)
        tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.model.device)
        h = await self.model.forward(tokens, segments, self.dispatcher)  # [T, H]
        if last_only:
            h = h[torch.tensor([s.start + s.n - 1 for s in segments], device=h.device)]
        return h

    def _run(self, coro):
        return self._loop.run_until_complete(coro)
