"""The transformers backend: any causal LM from the Hugging Face hub, a local path or a GGUF file.

Runs on CPU or GPU. Scoring reads only the logits it needs (``logits_to_keep``).
The fused episode call runs each episode in one forward: the judge suffix of
every turn is appended to the episode as a branch that attends to the episode
up to that turn's response and to itself, never to another branch (branches.py:
a 4-D attention mask and explicit position ids), so teacher cost stays linear in
the number of turns.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from client.protocol import SpanScores
from services.teacher.backends.base import (
    EpisodeItem,
    EpisodeScores,
    JudgeItem,
    ScoreItem,
    TeacherBackend,
)
from services.teacher.backends.branches import BranchLayout

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TransformersBackend(TeacherBackend):
    kind = "transformers"

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "float32",
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__()
        self.device = pick_device(device)
        self.dtype = dtype
        options = {"revision": revision, "trust_remote_code": trust_remote_code}
        if gguf_file:
            options["gguf_file"] = gguf_file
        self.tokenizer = AutoTokenizer.from_pretrained(source, **options)
        torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **options)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0

    # ------------------------------------------------------------------ forward

    @torch.inference_mode()
    def _logprobs_at(
        self,
        sequences: list[list[int]],
        reads: list[list[int]],
        attention_mask_B1LL: torch.Tensor | None = None,
        position_ids_BL: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Forward a right-padded batch; per sequence, log-probs [R, V] at its read positions."""
        B, L = len(sequences), max(len(s) for s in sequences)
        input_ids_BL = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        for b, ids in enumerate(sequences):
            input_ids_BL[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_BL[b, : len(ids)] = 1
        keep = sorted({p for positions in reads for p in positions})
        column = {p: i for i, p in enumerate(keep)}
        kwargs = {}
        if attention_mask_B1LL is not None:
            # A custom mask is taken as given: additive, on the device, in the model's dtype.
            kwargs["attention_mask"] = attention_mask_B1LL
            kwargs["position_ids"] = position_ids_BL.to(self.device)
        else:
            kwargs["attention_mask"] = mask_BL.to(self.device)
        output = self.model(
            input_ids=input_ids_BL.to(self.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            use_cache=False,
            **kwargs,
        )
        self.count_forwarded(sum(len(s) for s in sequences))
        logprobs_BKV = torch.log_softmax(output.logits.float(), dim=-1)
        return [
            logprobs_BKV[b, [column[p] for p in positions]] for b, positions in enumerate(reads)
        ]

    @staticmethod
    def _span_scores(logprobs_RV: torch.Tensor, targets: list[int], top_k: int) -> SpanScores:
        target_R = torch.tensor(targets, dtype=torch.long, device=logprobs_RV.device)
        given_R = logprobs_RV.gather(1, target_R[:, None])[:, 0]
        top1_R = logprobs_RV.max(dim=1).values.exp()
        given = given_R.tolist()
        topk_ids = topk_logprobs = None
        if top_k > 0:
            values_RK, ids_RK = logprobs_RV.topk(top_k, dim=1)
            topk_ids, topk_logprobs = ids_RK.tolist(), values_RK.tolist()
            for ids, values, target, logprob in zip(
                topk_ids, topk_logprobs, targets, given, strict=True
            ):
                if target not in ids:
                    ids.append(target)
                    values.append(logprob)
        return SpanScores.model_construct(
            logprobs=given,
            top1_probs=top1_R.tolist(),
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )

    def _scores_of(
        self, item: ScoreItem, logprobs_RV: torch.Tensor, top_k: int
    ) -> list[SpanScores]:
        """Split one sequence's read rows (ordered as ``_score_reads``) into its spans."""
        out, row = [], 0
        for start, end in item.spans:
            n = end - start
            out.append(
                self._span_scores(logprobs_RV[row : row + n], item.input_ids[start:end], top_k)
            )
            row += n
        return out

    @staticmethod
    def _score_reads(item: ScoreItem) -> list[int]:
        # The token at position p is predicted by the logits at p - 1.
        return [p - 1 for start, end in item.spans for p in range(start, end)]

    # ------------------------------------------------------------------ the interface

    def score(self, items: list[ScoreItem], top_k: int) -> list[list[SpanScores]]:
        rows = self._logprobs_at(
            [i.input_ids for i in items], [self._score_reads(i) for i in items]
        )
        return [self._scores_of(item, r, top_k) for item, r in zip(items, rows, strict=True)]

    def label_probs(self, items: list[JudgeItem], label_ids: list[int]) -> list[list[float]]:
        rows = self._logprobs_at(
            [i.input_ids for i in items], [[len(i.input_ids) - 1] for i in items]
        )
        return [_renormalised(r[0], label_ids) for r in rows]

    def score_episodes(
        self, items: list[EpisodeItem], top_k: int, label_ids: list[int]
    ) -> list[EpisodeScores]:
        if all(item.judge_suffixes is None for item in items):
            return super().score_episodes(items, top_k, label_ids)
        layouts = [_branch_layout(item) for item in items]
        L = max(len(layout.input_ids) for layout in layouts)
        # The one [L, L] tensor per episode, written in place where the model reads it.
        mask_B1LL = torch.empty((len(layouts), 1, L, L), dtype=self.model.dtype, device=self.device)
        for layout, mask_1LL in zip(layouts, mask_B1LL, strict=True):
            layout.write_additive_mask(mask_1LL[0])
        positions_BL = torch.stack([layout.position_ids(L) for layout in layouts])
        reads = [
            self._score_reads(ScoreItem(i.input_ids, i.spans)) + layout.last_positions()
            for i, layout in zip(items, layouts, strict=True)
        ]
        rows = self._logprobs_at([x.input_ids for x in layouts], reads, mask_B1LL, positions_BL)
        results = []
        for item, layout, r in zip(items, layouts, rows, strict=True):
            n_scored = len(r) - len(layout.branches)
            spans = self._scores_of(ScoreItem(item.input_ids, item.spans), r[:n_scored], top_k)
            probs = [_renormalised(row, label_ids) for row in r[n_scored:]]
            results.append(EpisodeScores(spans, probs if item.judge_suffixes is not None else None))
        return results

    @torch.inference_mode()
    def continue_greedy(
        self, input_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], list[float]]:
        ids_1L = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        output = self.model.generate(
            ids_1L,
            attention_mask=torch.ones_like(ids_1L),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
        )
        new_ids = output.sequences[0, len(input_ids) :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), dim=-1)[token].item()
            for step, token in zip(output.scores, new_ids, strict=False)
        ]
        self.count_forwarded(len(input_ids) + len(new_ids))
        return new_ids, logprobs

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _renormalised(logprobs_V: torch.Tensor, label_ids: list[int]) -> list[float]:
    return torch.softmax(logprobs_V[label_ids], dim=0).tolist()


def _branch_layout(item: EpisodeItem) -> BranchLayout:
    """The episode and its judge branches (each turn's judge suffix after its response);
    none when it is scored without the judge (a micro-batch may hold judged and unjudged
    episodes of different trainers)."""
    if item.judge_suffixes is None:
        return BranchLayout.build(item.input_ids, [])
    branches = zip(item.spans, item.judge_suffixes, strict=True)
    return BranchLayout.build(item.input_ids, [(end, suffix) for (_, end), suffix in branches])


def local_revision(path: str | Path) -> str | None:
    """A short content hash of a local model directory or file (None for hub ids)."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:  # head and tail: cheap, and differ between checkpoints
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()[:12]
