"""Direct Preference Optimization (Rafailov et al., 2023), the hosted API's method.type=dpo.

For a pair (x, y_w preferred, y_l not), with log-probs summed over the output tokens only:

    reward(y)  = beta * (log pi(y | x) - log pi_ref(y | x))
    loss       = -log sigmoid(reward(y_w) - reward(y_l))        (+ rpo_alpha * NLL of y_w per token)

The reference pi_ref is the policy before training: for a fresh LoRA the backbone itself (the
adapter's B is zero), for a job continuing an `ft:` model that model's adapter. So there is no
second model: `prepare` computes pi_ref's log-probs of every pair once, in one no-grad pass before
the first step, and keeps them with the tokenized data (`trainer.data.cache`); every epoch, resume
and later job from the same starting model reads them back. At the first step the policy is the
reference, every reward is 0 and the loss is ln 2 (dropout off).

A pair's two outputs go through one forward pass, in one row with the prompt computed once
(`shared_prompt`, `trainer.data.pairs`): measured against two padded or packed sequences a pair in
README's Preference fine-tuning section.

Metrics: reward accuracy (the share of pairs whose preferred reward is higher), reward margin and
the mean chosen and rejected rewards; results.csv's train_loss / train_accuracy are the DPO loss
and the reward accuracy, the rest go to preference_results.csv.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.data.cache import load_reference, save_reference, tokenize_pairs_file
from trainer.data.pairs import PairDataset, pair_batch, pair_batches
from trainer.data.tokenize import IGNORE_INDEX
from trainer.hyperparams import resolve_beta
from trainer.loss import supervised_outputs, token_log_probs
from trainer.methods import Batching, autocast

STATISTICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def sequence_log_probs(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of the labelled tokens of each of the batch's sequences (fp32, in sequence order)."""
    outputs, targets, positions, head = supervised_outputs(model, batch)
    log_probs = token_log_probs(outputs, targets, head)
    owners = batch["sequence_index"][:, positions + 1][targets != IGNORE_INDEX]
    n_sequences = 2 * batch["pair_index"].numel()
    return torch.zeros(n_sequences, dtype=torch.float32, device=log_probs.device).index_add(0, owners, log_probs)


class PreferenceObjective:
    """Sigmoid DPO with `beta`, optionally with RPO's NLL term on the preferred output."""

    results_columns = tuple(f"{split}_{name}" for split in ("train", "valid") for name in STATISTICS)
    results_file = "preference_results.csv"

    def __init__(self, beta="auto", base_learning_rate: float = 2e-4, rpo_alpha: float | None = None,
                 shared_prompt: bool = True):
        self.beta = resolve_beta(beta)
        self.shared_prompt = shared_prompt
        self.shared_prompt_width = None  # the longest shared-prompt row the model's attention takes (set by prepare)
        self.rpo_alpha = float(rpo_alpha or 0.0)
        self.base_learning_rate = float(base_learning_rate)
        self.hyperparameters = {"beta": self.beta} | ({"rpo_alpha": self.rpo_alpha} if self.rpo_alpha else {})

    def tokenize(self, path: Path, tokenizer, chat: bool, max_length: int, cache_dir):
        return tokenize_pairs_file(path, tokenizer, max_length, cache_dir)

    @torch.no_grad()
    def prepare(self, model, datasets: list[PairDataset], batching: Batching, model_key: str,
                device: str = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 8) -> None:
        """The reference log-probs of every pair of `datasets`, read back when kept, else computed now, in one
        no-grad pass in file order, with the model as it is before training."""
        self.shared_prompt_width = self._shared_prompt_width(model)
        was_training = model.training
        model.eval()
        for dataset in datasets:
            dataset.reference = load_reference(dataset, model_key)
            if dataset.reference is not None:
                continue
            reference = torch.empty(len(dataset.pairs), 2)
            for batch in pair_batches(dataset, batch_size, 0, 0, batching.pad_token_id, batching.packing,
                                      row_length=batching.row_length, shuffle=False,
                                      shared_prompt_width=self.shared_prompt_width):
                with autocast(device, dtype):
                    log_probs = sequence_log_probs(model, {k: v.to(device) for k, v in batch.items()})
                reference[batch["pair_index"]] = log_probs.view(-1, 2).cpu()
            dataset.reference = reference
            save_reference(dataset, model_key, reference)
        model.train(was_training)

    def _shared_prompt_width(self, model) -> float | None:
        """How long a shared-prompt row may be: any length for transformers' attention, which takes its 4D mask as it
        is; up to SHORT_ROW for ftlab's packed-rows attention, which masks longer rows one example at a time."""
        from trainer.attention import PACKED_ROWS, SHORT_ROW

        if not self.shared_prompt:
            return None
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        return SHORT_ROW if attention == PACKED_ROWS else float("inf")

    def batches(self, dataset: PairDataset, batch_size: int, epoch: int, batching: Batching):
        self._training = (dataset, batching)  # what `split` cuts a batch of into fewer pairs
        return pair_batches(dataset, batch_size, batching.seed, epoch, batching.pad_token_id, batching.packing,
                            batching.shard, batching.row_length, shared_prompt_width=self.shared_prompt_width)

    def split(self, batch: dict, micro: int | None):
        """The batch in pieces of `micro` pairs (both outputs of a pair stay in one forward)."""
        pairs = batch["pair_index"]
        if not micro or micro >= pairs.numel():
            yield batch
            return
        dataset, batching = self._training
        for chunk in pairs.split(micro):
            yield pair_batch(dataset, chunk.tolist(), batching.pad_token_id, batching.packing, batching.row_length,
                             weight=float(batch["pair_weight"][0]), shared_prompt_width=self.shared_prompt_width)

    def count(self, batch: dict) -> int:
        """Pairs (the loss is their mean)."""
        return int(batch["pair_weight"].sum())

    def forward(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed DPO loss of the batch's pairs and the sums of their statistics."""
        log_probs = sequence_log_probs(model, batch).view(-1, 2)
        rewards = self.beta * (log_probs - batch["reference"])  # (pairs, [preferred, non-preferred])
        margins = rewards[:, 0] - rewards[:, 1]
        losses = -F.logsigmoid(margins)
        if self.rpo_alpha:
            losses = losses - self.rpo_alpha * log_probs[:, 0] / batch["output_tokens"][:, 0].clamp(min=1)
        weight = batch["pair_weight"]
        loss_sum = (losses * weight).sum()
        rewards, margins = rewards.detach() * weight[:, None], margins.detach() * weight
        return loss_sum, {"loss": loss_sum.item(), "reward_accuracy": float(((margins > 0) * weight).sum()),
                          "reward_margin": float(margins.sum()), "chosen_reward": float(rewards[:, 0].sum()),
                          "rejected_reward": float(rewards[:, 1].sum())}

    def metrics(self, totals: dict, split: str) -> dict:
        """results.csv's loss and accuracy (the reward accuracy) for `split`, and the preference metrics."""
        n = max(totals["count"], 1)
        accuracy = "train_accuracy" if split == "train" else "valid_mean_token_accuracy"
        means = {f"{split}_{name}": round(totals[name] / n, 6) for name in STATISTICS}
        return {f"{split}_loss": round(totals["loss"] / n, 6), accuracy: means[f"{split}_reward_accuracy"]} | means

    @torch.no_grad()
    def evaluate(self, model, dataset: PairDataset, batch_size: int, batching: Batching, device: str,
                 dtype: torch.dtype) -> dict:
        """The statistics summed over this rank's share of the validation pairs."""
        totals = dict.fromkeys(("count", "loss", *STATISTICS), 0.0)
        for batch in pair_batches(dataset, batch_size, 0, 0, batching.pad_token_id, batching.packing,
                                  shard=batching.shard, row_length=batching.row_length, shuffle=False,
                                  shared_prompt_width=self.shared_prompt_width):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, dtype):
                _, statistics = self.forward(model, batch)
            totals["count"] += self.count(batch)
            for key, value in statistics.items():
                totals[key] += value
        return totals
