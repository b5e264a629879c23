"""One update on fixed episodes, in a torchrun rank or alone (tests/trainer/test_distributed.py).

    torchrun --nproc-per-node N tests/trainer/ddp_update.py CASE.pkl OUT.pt
    python tests/trainer/ddp_update.py CASE.pkl OUT.pt

CASE.pkl holds the train config, the student's folder and batches of supervised
episodes; each batch updates the student anew from its initial weights, on this
rank's share of the batch. Rank 0 saves each update's parameters and metrics.
"""

from __future__ import annotations

import pickle
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.prompts import ChatRenderer
from trainer.distributed import data_parallel, leave, wrap
from trainer.sft import make_optimizer
from trainer.update import build_batch, train_on_batch


def main(case_file: str, out_file: str) -> None:
    with open(case_file, "rb") as handle:
        case = pickle.load(handle)
    config = case["config"]
    data = data_parallel()
    tokenizer = AutoTokenizer.from_pretrained(case["student"])
    renderer = ChatRenderer(tokenizer, show_admissible=config.show_admissible)
    results = []
    for episodes in case["batches"]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(case["student"]).train()
        optimizer = make_optimizer(model, config.lr, config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        batch = build_batch(renderer, data.share(episodes), config)
        metrics = train_on_batch(
            wrap(model, data), optimizer, scheduler, batch, config, tokenizer.pad_token_id, data
        )
        results.append({"metrics": metrics, "parameters": model.state_dict()})
    if data.main:
        torch.save(results, out_file)
    leave(data)


if __name__ == "__main__":
    main(*sys.argv[1:])
