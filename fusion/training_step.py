"""One training step's forward: the loss summed over the supervised tokens (the LM head computed at those
positions only), normalised over the whole optimizer step, and the router load per expert."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import IGNORE_INDEX, next_token_targets
from .model import FusionModel


def supervised_loss_sum(model: FusionModel, inputs: dict, labels: torch.Tensor):
    """model(**inputs) with logits at the supervised positions only -> (output, summed next-token
    cross-entropy, number of supervised tokens). The LM head skips image, prompt and padding tokens."""
    targets = next_token_targets(labels)
    supervised = targets != IGNORE_INDEX
    out = model(**inputs, logits_at=supervised)
    return out, F.cross_entropy(out.logits.float(), targets[supervised], reduction="sum"), supervised.sum()


class TrainingStep(nn.Module):
    """forward(batch) -> (summed token loss / normalizer (+ aux loss), router load per layer).

    A module so DDP can wrap it; the loss is a sum over tokens divided by the number of supervised
    tokens of the whole optimizer step (all processes, all micro-batches), passed in as `normalizer`.
    """

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict, normalizer: torch.Tensor, aux_scale: float):
        labels = inputs.pop("labels")
        out, token_loss, _ = supervised_loss_sum(self.model, inputs, labels)
        loss = token_loss / normalizer
        if out.aux_loss is not None:
            loss = loss + aux_scale * out.aux_loss
        return loss, token_loss.detach(), self._router_load(out.image_mask, inputs["attention_mask"])

    @torch.no_grad()
    def _router_load(self, image_mask, attention_mask):
        """[moe_layers, 2 (image, text), experts] tokens routed, from the last forward."""
        moes = self.model.decoder.moe_layers()
        if not moes:
            return torch.zeros(0)
        valid = attention_mask.bool().flatten()
        image = image_mask.flatten() & valid
        text = ~image_mask.flatten() & valid
        loads = []
        for moe in moes:
            chosen = moe.last_chosen  # [N, k]
            E = moe.num_experts
            loads.append(torch.stack([torch.bincount(chosen[image].flatten(), minlength=E),
                                      torch.bincount(chosen[text].flatten(), minlength=E)]))
        return torch.stack(loads).float()
