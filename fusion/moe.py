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
from torch.utils.flop_counter import register_flop_formula

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
        return self._forward_loop(x_sorted, counts)

    def _forward_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self._run(looped_experts, x_sorted, counts)

    def _forward_grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self._run(grouped_experts, x_sorted, counts)

    def _run(self, experts_op, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`experts_op` (`looped_experts` or `grouped_experts`) in the compute dtype, outside autocast."""
        dtype = _compute_dtype(x_sorted)
        with torch.autocast(x_sorted.device.type, enabled=False):
            return experts_op(x_sorted.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype), counts)[0]


def _grouped_layout(counts: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The padded layout of `torch._grouped_mm` for `rows` rows grouped by expert (`counts` [E]): each expert's
    group padded with zero rows to a multiple of GROUP_ALIGN (an empty one to GROUP_ALIGN). Returns the padded row
    of each row [rows], the end of each group [E] (int32, grouped_mm's `offs`) and the padded row count."""
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    padded = torch.where(counts == 0, torch.full_like(padded, GROUP_ALIGN), padded)
    ends = padded.cumsum(0)
    group_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first_row = (counts.cumsum(0) - counts)[group_of_row]
    dest = (ends - padded)[group_of_row] + torch.arange(rows, device=counts.device) - first_row
    return dest, ends.to(torch.int32), int(ends[-1])


def _padded(rows: torch.Tensor, dest: torch.Tensor, total: int) -> torch.Tensor:
    return rows.new_zeros(total, rows.shape[1]).index_copy(0, dest, rows)


# The grouped-matmul experts as a custom op, as the loop below and for the same reason: the padded layout's size
# comes from the data (`int(ends[-1])`), which a compiled graph cannot hold; torch.compile sees one call.
@torch.library.custom_op("fusion::grouped_experts", mutates_args=())
def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`looped_experts` with two grouped matmuls (`torch._grouped_mm`) over the rows padded per expert: the same
    inputs and outputs (out [M, D], h = x @ gate_up [M, 2F])."""
    dest, offs, total = _grouped_layout(counts, x.shape[0])
    h = torch._grouped_mm(_padded(x, dest, total), gate_up, offs=offs)  # [total, 2F] gate ‖ up
    gate, up = h.chunk(2, dim=-1)
    out = torch._grouped_mm(F.silu(gate) * up, down, offs=offs)
    return out.index_select(0, dest), h.index_select(0, dest)


@torch.library.custom_op("fusion::grouped_experts_backward", mutates_args=())
def grouped_experts_backward(grad_out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                             h: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `grouped_experts` for x, gate_up and down, by grouped matmuls over the padded rows (an
    expert with no rows has only zero rows: a zero gradient)."""
    hidden = down.shape[1]
    dest, offs, total = _grouped_layout(counts, x.shape[0])
    grad_padded, h_padded = _padded(grad_out.contiguous(), dest, total), _padded(h, dest, total)
    gate, up = h_padded[:, :hidden], h_padded[:, hidden:]
    silu_gate = F.silu(gate)
    grad_down = torch._grouped_mm((silu_gate * up).t(), grad_padded, offs=offs)  # [E, F, D]
    grad_act = torch._grouped_mm(grad_padded, down.transpose(1, 2), offs=offs)  # [total, F]
    grad_h = torch.cat([torch.ops.aten.silu_backward(grad_act * up, gate), grad_act * silu_gate], dim=1)
    grad_gate_up = torch._grouped_mm(_padded(x, dest, total).t(), grad_h, offs=offs)  # [E, D, 2F]
    grad_x = torch._grouped_mm(grad_h, gate_up.transpose(1, 2), offs=offs).index_select(0, dest)
    return grad_x, grad_gate_up, grad_down


# The experts' loop as a custom op: torch.compile sees one opaque call whose outputs have the shapes of its
# inputs, so a compiled MoE block keeps routing, sorting and unsorting in its graph. Inside, the loop needs the
# rows per expert as Python numbers (`counts.tolist()`), which dynamo cannot trace without breaking the graph.
@torch.library.custom_op("fusion::looped_experts", mutates_args=())
def looped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU experts over rows grouped by expert, one matmul per non-empty expert: x [M, D] (rows in expert
    order), gate_up [E, D, 2F], down [E, F, D], counts [E] -> (out [M, D], h = x @ gate_up [M, 2F], which alone
    the backward keeps). Each expert's rows are written straight into preallocated buffers (no per-expert
    outputs to concatenate)."""
    hidden = down.shape[1]
    h = x.new_empty(x.shape[0], 2 * hidden)  # [M, 2F] gate ‖ up
    act = x.new_empty(x.shape[0], hidden)  # [M, F]
    out = x.new_empty(x.shape)  # [M, D]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            torch.mm(x[rows], gate_up[e], out=h[rows])
            torch.mul(F.silu(h[rows, :hidden]), h[rows, hidden:], out=act[rows])
            torch.mm(act[rows], down[e], out=out[rows])
        start += n
    return out, h


@torch.library.custom_op("fusion::looped_experts_backward", mutates_args=())
def looped_experts_backward(grad_out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                            h: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `looped_experts` for x, gate_up and down, written into buffers per expert (no
    autograd); an expert with no rows gets a zero gradient."""
    hidden = down.shape[1]
    grad_out = grad_out.contiguous()
    grad_x, grad_h = torch.empty_like(x), torch.empty_like(h)
    grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
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
    return grad_x, grad_gate_up, grad_down


def _keep_for_backward(ctx, inputs, output):
    x, gate_up, down, counts = inputs
    ctx.save_for_backward(x, gate_up, down, output[1], counts)
    ctx.mark_non_differentiable(output[1])


# Both ways of running the experts: the shapes of their outputs (for compiling), and their backward.
def _experts_shapes(x, gate_up, down, counts):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], 2 * down.shape[1])


def _experts_backward_shapes(grad_out, x, gate_up, down, h, counts):
    return torch.empty_like(x), torch.empty_like(gate_up), torch.empty_like(down)


def _gradients_by(backward):
    def gradients(ctx, grad_out, grad_h):
        return (*backward(grad_out, *ctx.saved_tensors), None)

    return gradients


for _op, _backward in ((looped_experts, looped_experts_backward), (grouped_experts, grouped_experts_backward)):
    _op.register_fake(_experts_shapes)
    _backward.register_fake(_experts_backward_shapes)
    _op.register_autograd(_gradients_by(_backward), setup_context=_keep_for_backward)


# What torch.utils.flop_counter.FlopCounterMode counts for the loop (it cannot see inside a custom op): the
# matmuls of the rows each expert computes, M rows in all (x [M, D], down [E, F, D]).
@register_flop_formula([torch.ops.fusion.looped_experts, torch.ops.fusion.grouped_experts])
def _looped_experts_flops(x_shape, gate_up_shape, down_shape, counts_shape, out_shape=None) -> int:
    (rows, dim), hidden = x_shape, down_shape[1]
    return 2 * rows * dim * 2 * hidden + 2 * rows * hidden * dim


@register_flop_formula([torch.ops.fusion.looped_experts_backward, torch.ops.fusion.grouped_experts_backward])
def _looped_experts_backward_flops(grad_out_shape, x_shape, gate_up_shape, down_shape, h_shape, counts_shape,
                                   out_shape=None) -> int:
    return 2 * _looped_experts_flops(x_shape, gate_up_shape, down_shape, counts_shape)


def sort_tokens_by_expert(chosen: torch.Tensor, num_experts: int):
    """chosen [N, k] expert ids -> (order [N·k], counts [E]).

    Row j of the sorted batch is the pair (token order[j] // k, its (order[j] % k)-th expert); rows are
    grouped by expert in increasing expert order.
    """
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # a scatter of static size, not bincount (whose size depends on the data, which breaks a compiled graph)
    counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
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
