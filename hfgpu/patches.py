"""Leaner building blocks swapped into transformers models (same math, less memory).

`lean_rmsnorm(model)`: transformers' Llama-style RMSNorm upcasts its input to fp32 and autograd keeps
that fp32 copy for backward (tokens × hidden × 4 bytes, twice per decoder layer). The replacement
keeps the 16-bit input and the per-token 1/rms instead and rebuilds the rest in backward, doing its
fp32 arithmetic over slices of NORM_ROWS tokens so no full-size fp32 temporary exists either. Output and
gradients equal transformers' within rounding (tests/test_patches.py). Only classes known to compute
`weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)` are swapped (Gemma's `1 + weight` is not).
"""

from __future__ import annotations

import torch

from hfgpu.knobs import RMSNORM_BY_MODEL_TYPE, TILED_MLP_MODEL_TYPES  # torch-free, shared with the planner
from hfgpu.memory import MLP_TILE, upcast_slice_rows

RMSNORM_CLASSES = set(RMSNORM_BY_MODEL_TYPE.values())


NORM_ROWS = 1024  # tokens per slice of the norm's fp32 arithmetic


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        rstd = torch.empty(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        normed = torch.empty_like(flat)
        for i in range(0, flat.shape[0], NORM_ROWS):  # fp32 temporaries for one slice of tokens at a time
            x32 = flat[i : i + NORM_ROWS].to(torch.float32, copy=True)  # a copy even when x is fp32: modified in place
            rstd[i : i + NORM_ROWS] = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            normed[i : i + NORM_ROWS] = x32.mul_(rstd[i : i + NORM_ROWS])
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        need_w = ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_x = torch.empty_like(flat)
        w32 = weight.float()
        for i in range(0, flat.shape[0], NORM_ROWS):
            r = rstd[i : i + NORM_ROWS]
            xhat = flat[i : i + NORM_ROWS].to(torch.float32, copy=True).mul_(r)
            g32 = g[i : i + NORM_ROWS].to(torch.float32, copy=True)
            if need_w:
                grad_w += (g32 * xhat.to(x.dtype).float()).sum(0)
            gy = g32.mul_(w32)
            dot = (gy * xhat).mean(-1, keepdim=True)
            grad_x[i : i + NORM_ROWS] = gy.sub_(xhat.mul_(dot)).mul_(r)
        return grad_x.reshape(x.shape), (grad_w.to(weight.dtype) if need_w else None), None


def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_rmsnorm(model: torch.nn.Module) -> int:
    """Swap the forward of every known Llama-style RMSNorm in `model`; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ in RMSNORM_CLASSES and hasattr(module, "variance_epsilon") and hasattr(module, "weight"):
            module.forward = _lean_forward.__get__(module)
            n += 1
    return n


# --- tiled MLP ---------------------------------------------------------------------------------------


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _TiledMLP(torch.autograd.Function):
    """A per-token MLP over tiles of `tile` tokens: forward keeps only the input, backward recomputes
    one tile at a time, so the b·s × intermediate tensors exist for one tile only. Saves its input
    first, so that a checkpointed layer's recompute stops there instead of running the MLP again."""

    @staticmethod
    def forward(ctx, fn, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        kind = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.rng = _rng_state(x.device)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([fn(t) for t in flat.split(tile)])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        grad_x = torch.empty_like(x).reshape(-1, x.shape[-1]) if need_x else None
        grad_p: list[torch.Tensor | None] = [None] * len(wanted)
        flat, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        cpu_state, cuda_state = ctx.rng
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autocast(x.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
            torch.set_rng_state(cpu_state)  # the same dropout masks as forward (tiles run in the same order)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            for start in range(0, flat.shape[0], ctx.tile):
                t = flat[start : start + ctx.tile].detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y = ctx.fn(t)
                grads = torch.autograd.grad(y, ([t] if need_x else []) + wanted, g[start : start + ctx.tile], allow_unused=True)
                if need_x:
                    grad_x[start : start + ctx.tile] = grads[0]
                    grads = grads[1:]
                for i, gp in enumerate(grads):
                    if gp is not None:
                        grad_p[i] = gp if grad_p[i] is None else grad_p[i] + gp
        it = iter(grad_p)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_x.reshape(x.shape) if need_x else None, *param_grads)


def tile_mlps(model: torch.nn.Module, tile: int | None = None) -> int:
    """Run every decoder layer's `mlp` in tiles of `tile` tokens (see _TiledMLP) when the model type's
    MLP is dense and per token (knobs.TILED_MLP_MODEL_TYPES); returns how many. Call it after peft
    has wrapped the model: the tiles' parameters are those training at that point."""
    tile = tile or MLP_TILE
    if getattr(getattr(model, "config", None), "model_type", None) not in TILED_MLP_MODEL_TYPES:
        return 0
    n = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp":
            continue
        plain = type(module).forward.__get__(module)
        params = tuple(p for p in module.parameters() if p.requires_grad)
        module.forward = lambda x, _fn=plain, _params=params: _TiledMLP.apply(_fn, tile, x, *_params)
        n += 1
    return n


# --- 16-bit frozen storage, fp32 compute (GTX 10 / Pascal) ------------------------------------------


def sliced_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`x @ w.T` in x's dtype for a 16-bit `w` (out, in), casting UPCAST_SLICE_BYTES of its rows at a time."""
    rows = upcast_slice_rows(w.shape[1])
    if w.shape[0] <= rows:
        return x @ w.to(x.dtype).t()
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    for v in range(0, w.shape[0], rows):
        out[..., v : v + rows] = x @ w[v : v + rows].to(x.dtype).t()
    return out


def sliced_linear_grad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`g @ w` in g's dtype for a 16-bit `w` (out, in), by the same slices of rows."""
    rows = upcast_slice_rows(w.shape[1])
    if w.shape[0] <= rows:
        return g @ w.to(g.dtype)
    out = g.new_zeros(*g.shape[:-1], w.shape[1])
    for v in range(0, w.shape[0], rows):
        out += g[..., v : v + rows] @ w[v : v + rows].to(g.dtype)
    return out


class _UpcastLinear(torch.autograd.Function):
    """`x @ w.T + b` in x's dtype (fp32) from a frozen weight stored in 16 bits, over slices of the weight's
    output rows (sliced_linear): no fp32 copy of a whole weight exists, in forward or in backward, and nothing
    of it is saved (lm_head is 2 GB in fp32 for Llama-3). The weight is frozen: no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.transposed = transposed
        out = sliced_linear(x, weight.t() if transposed else weight)  # Conv1D stores (in, out)
        return out + bias.to(x.dtype) if bias is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        return sliced_linear_grad(grad, weight.t() if ctx.transposed else weight), None, None, None


def _upcast_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x.to(self.compute_dtype), self.weight, self.bias, False)


def _upcast_conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x.to(self.compute_dtype), self.weight, self.bias, True)


def _upcast_output(module, args, output):
    return output.to(module.compute_dtype)


def upcast_per_use(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Frozen weights stored in 16 bits, computed in `compute_dtype` (fp32): the input embeddings (the
    gathered rows are cast), lm_head and every nn.Linear / Conv1D whose weight is 16-bit (cast per use, by
    slices of rows, by _UpcastLinear; the chunked loss casts lm_head by slices of the vocabulary, hfgpu.loss). Every other
    floating parameter and buffer (norms, biases outside linears, expert tensors) goes to `compute_dtype`:
    nothing else in the model knows how to mix dtypes. 4-bit/8-bit bitsandbytes layers are left as they are
    (they dequantize to their compute dtype themselves). Call on a frozen base, before peft wraps its
    layers. Returns how many modules cast per use."""
    from transformers.pytorch_utils import Conv1D

    sixteen = (torch.float16, torch.bfloat16)
    embeddings = model.get_input_embeddings()
    cast: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dtype not in sixteen:
            continue
        if module is embeddings:
            module.compute_dtype = compute_dtype
            module.register_forward_hook(_upcast_output)
        elif type(module) is torch.nn.Linear:
            module.compute_dtype = compute_dtype
            module.forward = _upcast_linear_forward.__get__(module)
        elif type(module) is Conv1D:
            module.compute_dtype = compute_dtype
            module.forward = _upcast_conv1d_forward.__get__(module)
        else:
            continue
        cast.add(id(module))
    bnb_layers = {id(m) for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}
    for module in model.modules():
        if id(module) in cast or id(module) in bnb_layers:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dtype in sixteen:
                p.data = p.data.to(compute_dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.dtype in sixteen:
                setattr(module, name, b.to(compute_dtype))
    return len(cast)
