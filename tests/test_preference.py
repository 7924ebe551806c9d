"""Preference losses and log-probs, against TRL's trainers on the same model and the same batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_sft.data.preference import PreferencePair, collate_pairs
from llama_sft.options import ArgumentError
from llama_sft.training.args import parse_train_args
from llama_sft.training.preference import (
    HeadLogProbs,
    PreferenceOptions,
    SequenceLogps,
    check_preference_flags,
    pack_rows,
    preference_loss,
    sequence_logps,
    total_loss,
)

PAD = 3
# Three pairs of literal ids: prompts start with BOS (1), answers end with EOS (2); lengths differ so
# that padding, packing and per-token averages all matter.
PAIRS = [
    PreferencePair([1, 40, 41, 42], [50, 51, 2], [60, 2]),
    PreferencePair([1, 43], [52, 53, 54, 55, 2], [61, 62, 2]),
    PreferencePair([1, 44, 45], [56, 2], [63, 64, 65, 66, 67, 2]),
]


@pytest.fixture(scope="module")
def models(model_dir):
    """The policy (the tiny base) and a reference that differs from it by a little noise."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy, reference


def ours(models, options: PreferenceOptions, packed: bool = False, head: bool = False):
    policy_model, reference_model = models
    batch = collate_pairs(PAIRS, PAD)
    if packed:
        batch = pack_rows(batch)
    with torch.no_grad():
        head_of = (lambda m: m.lm_head) if head else (lambda m: None)
        policy = sequence_logps(policy_model, batch, head_of(policy_model))
        reference = sequence_logps(reference_model, batch, head_of(reference_model)).sums
    return policy, total_loss(options, policy, reference)


def trl_dpo(models, tokenizer_dir, tmp_path, loss_type: str, beta: float):
    """TRL's DPOTrainer on the same pairs: its loss and the metrics it logs."""
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e .[bench])")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy_model, reference_model = models
    config = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        beta=beta,
        loss_type=[loss_type],
        use_cpu=True,
        bf16=False,  # TRL's default; llama-sft's is float32, and the comparison is at float32
        per_device_train_batch_size=len(PAIRS),
    )
    trainer = DPOTrainer(
        policy_model,
        ref_model=reference_model,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
    )
    examples = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in PAIRS]
    batch = DataCollatorForPreference(pad_token_id=PAD)(examples)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, False)
    # The models are in evaluation mode (no dropout to tell apart), where TRL files its metrics.
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    return float(loss), metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpo_trainer(models, tokenizer_dir, tmp_path, loss_type):
    options = PreferenceOptions(loss=loss_type, beta=0.3)
    results = [
        ours(models, options, packed, head) for packed, head in ((False, False), (True, False), (True, True))
    ]
    trl_loss, trl_metrics = trl_dpo(models, tokenizer_dir, tmp_path, loss_type, beta=0.3)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the policy and the reference differ
    for policy, (loss, _, chosen, rejected, _) in results:
        assert float(loss) == pytest.approx(trl_loss, abs=1e-4)
        assert float(chosen.mean()) == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
        assert float(rejected.mean()) == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
        assert float((chosen > rejected).float().mean()) == trl_metrics["rewards/accuracies"]
        chosen_logps, rejected_logps = policy.halves(averaged=False)
        assert float(chosen_logps.mean()) == pytest.approx(trl_metrics["logps/chosen"], abs=1e-4)
        assert float(rejected_logps.mean()) == pytest.approx(trl_metrics["logps/rejected"], abs=1e-4)
    assert results[0][0].counts.tolist() == [3, 5, 2, 2, 3, 6]


def test_orpo_and_simpo_equal_trl_orpo_and_cpo(models):
    pytest.importorskip("trl", reason="TRL is the bench extra (pip install -e .[bench])")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    policy_model = models[0]
    batch = collate_pairs(PAIRS, PAD)
    with torch.no_grad():
        logits = policy_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    average = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen_avg, rejected_avg = average.chunk(2)
    device = SimpleNamespace(device="cpu")

    orpo = PreferenceOptions(loss="orpo", beta=0.2)
    policy, (loss, _, chosen, rejected, nll_term) = ours(models, orpo)
    assert torch.allclose(policy.sums / policy.counts, average, atol=1e-5)
    losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        SimpleNamespace(beta=0.2, accelerator=device), chosen_avg, rejected_avg
    )
    # TRL's ORPO adds the chosen rows' mean cross-entropy (here over the answers, as llama-sft trains).
    half = len(PAIRS)
    nll = F.cross_entropy(logits[:half, :-1].flatten(0, 1), labels[:half, 1:].flatten(), ignore_index=-100)
    assert float(loss) == pytest.approx(float(nll - losses.mean()), abs=1e-4)
    assert float(nll_term) == pytest.approx(float(nll), abs=1e-5)
    assert torch.allclose(chosen, trl_chosen, atol=1e-5) and torch.allclose(rejected, trl_rejected, atol=1e-5)

    simpo = PreferenceOptions(loss="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1)
    _, (loss, _, chosen, rejected, nll_term) = ours(models, simpo)
    assert nll_term is None
    cpo = SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, accelerator=device
    )
    losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(cpo, chosen_avg, rejected_avg)
    assert float(loss) == pytest.approx(float(losses.mean()), abs=1e-4)
    assert torch.allclose(chosen, trl_chosen, atol=1e-5) and torch.allclose(rejected, trl_rejected, atol=1e-5)


def test_losses_on_literal_log_probs():
    # One pair: policy answers -10 (chosen, 4 tokens) and -14 (rejected, 2 tokens); reference -12, -13.
    policy = SequenceLogps(torch.tensor([-10.0, -14.0]), torch.tensor([4, 2]))
    reference = torch.tensor([-12.0, -13.0])
    # DPO: beta * ((-10 + 12) - (-14 + 13)) = 0.5 * 3 = 1.5; rewards 0.5 * 2 and 0.5 * -1.
    losses, chosen, rejected = preference_loss(PreferenceOptions("sigmoid", beta=0.5), policy, reference)
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert (float(chosen[0]), float(rejected[0])) == (1.0, -0.5)
    # Conservative DPO: the label is flipped with probability 0.1.
    losses, _, _ = preference_loss(PreferenceOptions("sigmoid", 0.5, label_smoothing=0.1), policy, reference)
    assert float(losses[0]) == pytest.approx(
        0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    )
    # IPO: per-token log-ratios 2/4 - (-1)/2 = 1, target 1 / (2 * 0.5) = 1: no loss.
    losses, _, _ = preference_loss(PreferenceOptions("ipo", beta=0.5), policy, reference)
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-7)
    # SimPO: averages -2.5 and -7, margin 4.5 - gamma 1 / beta 0.5 = 2.5, scaled by beta: 1.25.
    losses, chosen, _ = preference_loss(PreferenceOptions("simpo", 0.5, simpo_gamma=1.0), policy, None)
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-1.25)))
    assert float(chosen[0]) == -1.25
    # --pref_ftx adds the chosen answers' mean token cross-entropy: 10 / 4.
    loss, *_ = total_loss(PreferenceOptions("sigmoid", 0.5, ftx=2.0), policy, reference)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)) + 2.0 * 2.5)


def test_head_log_probs_equal_log_softmax_with_gradients():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    upstream = torch.randn(37, generator=generator)

    expected = F.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    import llama_sft.training.preference as preference

    # Chunks of 5 rows (not a divisor of 37): the chunked forward and backward must agree with one pass.
    original = preference.LOGIT_CHUNK_VALUES
    preference.LOGIT_CHUNK_VALUES = 5 * 50
    try:
        got = HeadLogProbs.apply(hidden, weight, targets)
        grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    finally:
        preference.LOGIT_CHUNK_VALUES = original
    assert torch.allclose(got, expected, atol=1e-5)
    for mine, reference in zip(grads, expected_grads, strict=True):
        assert torch.allclose(mine, reference, atol=1e-5)


def test_preference_flags_belong_to_dpo():
    argv = ["--model_name_or_path", "m", "--output_dir", "o", "--pref_beta", "0.2"]
    args = parse_train_args(argv)
    with pytest.raises(ArgumentError, match="--pref_beta is for preference training"):
        check_preference_flags(args, "sft")
    check_preference_flags(args, "dpo")
    with pytest.raises(ArgumentError, match="--pref_beta -1.0: must be above 0"):
        check_preference_flags(parse_train_args([*argv, "--pref_beta", "-1"]), "dpo")
    with pytest.raises(ArgumentError, match="--max_tokens_per_pass"):
        check_preference_flags(parse_train_args([*argv, "--max_tokens_per_pass", "64"]), "dpo")
