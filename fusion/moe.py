"""The Llama 4 MoE layer: sigmoid-scored top-k routing, experts that see only their own tokens, a shared
expert always added, and load balancing (aux-loss-free expert bias, optional auxiliary loss).

    logits = x @ W_router^T                       # [N, E], no bias
    chosen = topk(sigmoid(logits) + expert_bias)  # the bias moves the choice only
    score  = sigmoid(logits)[chosen]              # not renormalised
    y      = shared(x) + sum_k expert_k(score_k * x)   # the score scales the expert's INPUT
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .decoder_config import DecoderConfig

GROUP_ALIGN = 16  # rows per expert group are padded to this for torch._grouped_mm (16-byte aligned bf16)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute `x` in: autocast's where it is on for `x`'s device (a bf16 autocast over
    float32 weights, as in training), else `x`'s own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0))


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked, input-major as in Hugging Face's Llama 4 checkpoints:
    gate_up_proj [E, D, 2F] (gate ‖ up), down_proj [E, F, D].

    `forward` takes tokens already sorted by expert and the count per expert, and runs each expert on
    its own rows only: one grouped matmul where the device has it (CUDA, SM90+, computing in bf16: bf16
    weights, or bf16 autocast over float32 ones), else a loop over the non-empty experts.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D] (rows grouped by expert, in expert order), counts [E] -> [M, D]."""
        if _grouped_mm_available(x_sorted.device, _compute_dtype(x_sorted)):
            return self._forward_grouped_mm(x_sorted, counts)
        return self._forward_loop(x_sorted, counts.tolist())

    def _forward_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        dtype = _compute_dtype(x_sorted)
        with torch.autocast(x_sorted.device.type, enabled=False):
            return _LoopedExperts.apply(x_sorted.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype),
                                        counts)

    def _forward_grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Pad each expert's group to GROUP_ALIGN rows (zero rows), run two grouped matmuls, drop the padding.
        padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        padded = torch.where(counts == 0, torch.full_like(padded, GROUP_ALIGN), padded)
        ends = padded.cumsum(0)
        starts = ends - padded
        group_of_row = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)
        first_row = (counts.cumsum(0) - counts)[group_of_row]
        dest = starts[group_of_row] + torch.arange(x_sorted.shape[0], device=counts.device) - first_row
        offs = ends.to(torch.int32)
        dtype = _compute_dtype(x_sorted)
        with torch.autocast(x_sorted.device.type, enabled=False):
            x = x_sorted.to(dtype)
            buffer = x.new_zeros(int(ends[-1]), self.dim).index_copy(0, dest, x)
            gate, up = torch._grouped_mm(buffer, self.gate_up_proj.to(dtype), offs=offs).chunk(2, dim=-1)
            out = torch._grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype), offs=offs)
        return out.index_select(0, dest)


class _LoopedExperts(torch.autograd.Function):
    """SwiGLU experts over rows grouped by expert, one matmul per non-empty expert.

    Forward and backward write each expert's rows straight into preallocated buffers (no per-expert
    outputs to concatenate, no per-expert weight gradients to stack), and only `h = x @ gate_up` is
    kept for the backward.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, counts: list[int]):
        hidden = down.shape[1]
        h = x.new_empty(x.shape[0], 2 * hidden)  # [M, 2F] gate ‖ up
        act = x.new_empty(x.shape[0], hidden)  # [M, F]
        out = x.new_empty(x.shape)  # [M, D]
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], gate_up[e], out=h[rows])
                torch.mul(F.silu(h[rows, :hidden]), h[rows, hidden:], out=act[rows])
                torch.mm(act[rows], down[e], out=out[rows])
            start += n
        ctx.save_for_backward(x, gate_up, down, h)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up, down, h = ctx.saved_tensors
        hidden = down.shape[1]
        grad_out = grad_out.contiguous()
        grad_x, grad_h = torch.empty_like(x), torch.empty_like(h)
        grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert with no tokens gets a zero gradient
                grad_gate_up[e].zero_()
                grad_down[e].zero_()
                continue
            rows = slice(start, start + n)
            gate, up = h[rows, :hidden], h[rows, hidden:]
            silu_gate = F.silu(gate)
            torch.mm((silu_gate * up).t(), grad_out[rows], out=grad_down[e])
            grad_act = grad_out[rows] @ down[e].t()  # [n, F]
            torch.mul(grad_act, silu_gate, out=grad_h[rows, hidden:])
            grad_h[rows, :hidden] = torch.ops.aten.silu_backward(grad_act * up, gate)
            torch.mm(x[rows].t(), grad_h[rows], out=grad_gate_up[e])
            torch.mm(grad_h[rows], gate_up[e].t(), out=grad_x[rows])
            start += n
        return grad_x, grad_gate_up, grad_down, None


def sort_tokens_by_expert(chosen: torch.Tensor, num_experts: int):
    """chosen [N, k] expert ids -> (order [N·k], counts [E]).

    Row j of the sorted batch is the pair (token order[j] // k, its (order[j] % k)-th expert); rows are
    grouped by expert in increasing expert order.
    """
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


class MoE(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, E = config.hidden_size, config.num_experts
        self.num_experts, self.top_k = E, config.top_k
        self.load_balance_coeff = config.load_balance_coeff
        self.aux_loss_coef = config.aux_loss_coef
        self.router = nn.Linear(d, E, bias=False)
        self.experts = GroupedExperts(E, d, config.intermediate_size)
        self.shared_expert = FeedForward(d, config.intermediate_size)
        # Selection bias for aux-loss-free balancing (persistent: part of the trained model).
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        # Tokens per expert since the last bias update (training only).
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)
        self.last_counts: torch.Tensor | None = None  # [E] tokens per expert in the last forward
        self.last_counted: torch.Tensor | None = None  # [E] of those, the ones the balance counted
        # Whether padding counts for the balance (bias and aux loss). False: real tokens only, so the balance is
        # the same however a batch is padded or split. True: every routed token, as fusion counted until
        # 2026-12 (the shipped default model was trained so; its recipe sets `moe_count_padding: true`).
        self.count_padding = False
        self.last_chosen: torch.Tensor | None = None  # [N, k] experts chosen per token in the last forward
        self.aux_loss: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`, `.half()` and the like leave the balancing state in float32: the token counts and the
        bias's small steps would round away in bf16 (a count of 1603 reads 1600)."""
        super()._apply(fn, recurse)
        for name in ("expert_bias", "tokens_per_expert"):
            buffer = self._buffers[name]
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                self._buffers[name] = buffer.float()
        return self

    def route(self, x: torch.Tensor):
        """x [N, D] -> chosen experts [N, k], their gate scores [N, k] (fp32), all scores [N, E] (fp32).

        The choice is made in float64: float32 sigmoids of logits above ~17 are all exactly 1 and would tie
        (broken by expert index), where Meta's and Hugging Face's Llama 4 choose on the logits themselves;
        float64 keeps their ranking up to logits of ~36 (with no bias the same choice as theirs)."""
        logits = self.router(x).float()  # [N, E]
        scores = torch.sigmoid(logits)
        with torch.no_grad():
            ranking = torch.sigmoid(logits.double()) + self.expert_bias.double()
            chosen = torch.topk(ranking, self.top_k, dim=-1).indices
        return chosen, scores.gather(1, chosen), scores

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] -> [..., D]. `valid` (x's leading shape, bool): the real tokens, which alone count for the
        load balancing (bias and aux loss) unless `count_padding`; padding is routed like any token."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        chosen, gates, scores = self.route(x)
        k = self.top_k
        shared = self.shared_expert(x)
        if self.num_experts == 1:  # top-1 of one expert: tokens are already in expert order, nothing to sort
            counts = torch.full((1,), x.shape[0], dtype=torch.long, device=x.device)
            routed_in = (x.float() * gates).to(x.dtype)
            out = shared + self.experts(routed_in, counts).to(shared.dtype)
        else:
            order, counts = sort_tokens_by_expert(chosen, self.num_experts)
            routed_in = (x[order // k].float() * gates.reshape(-1)[order, None]).to(x.dtype)  # [N·k, D] sorted
            routed_out = self.experts(routed_in, counts)
            # back to (token, k) order with a gather (cheaper than a scatter-add, also for tiny decode batches)
            unsort = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            routed = routed_out.to(shared.dtype).index_select(0, unsort).view(-1, k, shared.shape[-1])
            out = shared + (routed[:, 0] if k == 1 else routed.sum(1))

        if self.count_padding:
            valid = None
        counted = counts
        if valid is not None:
            with torch.no_grad():
                weight = valid.reshape(-1, 1).expand(-1, k).reshape(-1).to(scores.dtype)
                counted = torch.zeros(self.num_experts, dtype=scores.dtype, device=x.device).index_add_(
                    0, chosen.reshape(-1), weight)
        self.last_counts, self.last_chosen, self.last_counted = counts.detach(), chosen.detach(), counted.detach()
        # Only a forward that can train counts for the balance: one under no_grad (generating with a model left
        # in train mode, say) must not move the next bias update.
        training = self.training and torch.is_grad_enabled()
        if training:
            with torch.no_grad():
                self.tokens_per_expert += counted.to(self.tokens_per_expert.dtype)
        self.aux_loss = (self._balance_loss(scores, counted, valid) if training and self.aux_loss_coef > 0
                         else None)
        return out.reshape(shape)

    def _balance_loss(self, scores: torch.Tensor, counts: torch.Tensor,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
        """Switch-style loss E * sum_e f_e * p_e (f: share of routed tokens, p: mean normalised score), over the
        counted tokens (`valid`: the real ones)."""
        fraction = counts.float() / counts.sum().clamp(min=1)
        normalised = scores / scores.sum(-1, keepdim=True)
        if valid is None:
            probability = normalised.mean(0)
        else:
            weight = valid.reshape(-1, 1).to(normalised.dtype)
            probability = (normalised * weight).sum(0) / weight.sum().clamp(min=1)
        return self.num_experts * (fraction * probability).sum()

    @torch.no_grad()
    def update_expert_bias(self):
        """One aux-loss-free balancing step (arXiv 2408.15664): nudge under-used experts up, over-used down."""
        counts = self.tokens_per_expert
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        if self.load_balance_coeff > 0 and counts.sum() > 0:
            delta = self.load_balance_coeff * torch.sign(counts.mean() - counts)
            self.expert_bias += delta - delta.mean()
        counts.zero_()
