from __future__ import annotations

import torch

from llama_sft.data.collate import Collator


def test_right_padding_literal_tensors():
    batch = Collator(pad_id=3)(
        [
            {"input_ids": [1, 10, 11, 12, 2], "labels": [-100, -100, 11, 12, 2]},
            {"input_ids": [1, 20, 2], "labels": [-100, 20, 2]},
        ]
    )
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 10, 11, 12, 2], [1, 20, 2, 3, 3]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 11, 12, 2], [-100, 20, 2, -100, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_to_multiple():
    batch = Collator(pad_id=0, pad_to_multiple_of=4)([{"input_ids": [1, 5, 2], "labels": [-100, 5, 2]}])
    assert batch["input_ids"].tolist() == [[1, 5, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0]]
