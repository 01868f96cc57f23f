"""Padding-free packing under FSDP2, at the model level: run by tests/test_fsdp.py as
`torchrun --nproc-per-node 2 tests/fsdp_packing_parity.py OUT.json` (CPU, gloo).

Every rank holds its own 3 documents and the same tiny gpt-oss, sharded with fully_shard per decoder layer and at the
root, with the train step's fast expert path and packed-document masks (steps.modeling). The documents' loss and
every gradient shard are computed three ways with the same weights:
- padded: one right-padded batch of the 3 documents with an attention mask (the reference layout);
- packed: one row of the 3 documents back to back, positions restarting per document, no attention mask (what TRL's
  padding-free collator feeds the model), the cross-document targets left out;
- leaky (negative control): the packed row with an all-ones attention mask, so the model's own causal mask lets each
  document attend to the ones before it.
Rank 0 writes {padded, packed, leaky: global mean NLL} and the largest relative gradient difference to OUT.json.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from steps.model import ModelConfig
from steps.modeling import fast_experts, load_model, mask_packed_documents

VOCAB, PAD = 512, 0
LENGTHS = (37, 52, 23)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of the next-token NLL over positions whose target is not -100, and their count."""
    keep = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return nll, int(keep.sum())


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    net = load_model(ModelConfig(name="random", tokenizer="o200k-offline", seed=0,
                                 random_shape={"preset": "tiny", "initializer_range": 0.3}),
                     vocab_size=VOCAB, dtype="float32", attn_implementation="eager", device="cpu")
    fast_experts(net)
    mask_packed_documents(net)
    for layer in net.model.layers:
        fully_shard(layer)
    fully_shard(net)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own documents
    docs = [torch.randint(1, VOCAB, (n,), generator=gen) for n in LENGTHS]

    width = max(LENGTHS)
    padded_ids = torch.full((len(docs), width), PAD)
    padded_mask = torch.zeros((len(docs), width), dtype=torch.long)
    padded_targets = torch.full((len(docs), width), -100)
    for i, doc in enumerate(docs):
        padded_ids[i, :len(doc)], padded_mask[i, :len(doc)] = doc, 1
        padded_targets[i, :len(doc) - 1] = doc[1:]
    packed_ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])[None]
    # position p predicts token p + 1, except across a document boundary
    packed_targets = torch.cat([torch.cat([doc[1:], torch.tensor([-100])]) for doc in docs])[None]

    def loss_and_grads(**batch):
        net.zero_grad()
        targets = batch.pop("targets")
        local_sum, count = nll_sum(net(**batch).logits, targets)
        (local_sum / count).backward()
        total = torch.stack([local_sum.detach(), torch.tensor(float(count))])
        dist.all_reduce(total)
        return float(total[0] / total[1]), [p.grad.to_local().clone() for p in net.parameters()]

    padded, padded_grads = loss_and_grads(input_ids=padded_ids, attention_mask=padded_mask, targets=padded_targets)
    packed, packed_grads = loss_and_grads(input_ids=packed_ids, position_ids=positions, targets=packed_targets)
    leaky, _ = loss_and_grads(input_ids=packed_ids, position_ids=positions, attention_mask=torch.ones_like(packed_ids),
                              targets=packed_targets)
    worst = max(float((b - a).norm() / a.norm()) for a, b in zip(padded_grads, packed_grads) if a.norm() > 0)
    nonzero = sum(bool(g.norm() > 0) for g in padded_grads)
    worst_all = torch.tensor(worst)
    dist.all_reduce(worst_all, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {"padded": padded, "packed": packed, "leaky": leaky, "grad_rel_diff_max": float(worst_all),
                  "grad_shards_nonzero": nonzero, "grad_shards": len(padded_grads), "world_size": dist.get_world_size(),
                  "sharded": all(hasattr(p, "to_local") for p in net.parameters())}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
