"""SAM-Med3D (official pip distribution ``medim``): architecture, strict loading, and an exact
fast path for the image encoder.

Shapes (ViT-B "vit_b_ori", 128^3 input, patch 16):

* image ``[B, 1, 128, 128, 128]`` (array order ``[i, j, k]`` of a canonical RAS window, z-scored);
* image embedding ``[B, 384, 8, 8, 8]`` (one token per 16^3 voxels);
* dense mask prompt ``[B, 1, 32, 32, 32]`` logits (4x the embedding grid);
* decoder output ``[B, 1, 32, 32, 32]`` logits, upsampled trilinearly to the window.

medim's own loader is not used (it loads with ``strict=False`` and without ``map_location``) and
neither is ``SAM_Med3D.forward`` (it calls "bilinear" interpolation on 5-D tensors): the
encoder, prompt encoder and mask decoder are called directly.

Fast encoder path (:func:`fast_block_forward`): SAM-Med3D's windowed blocks pad the 8^3 token
grid to one 14^3 window and compute attention for all 2744 window tokens, then keep the 512
real ones. The padded tokens are zero vectors after the block's LayerNorm, so their key and
value are exactly the ``qkv`` bias; computing attention *outputs* only for the 512 real query
tokens, against all 2744 keys (padded ones included, as in the module), gives the module's
result with about a fifth of the work. The medim module itself is never modified.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from spasem.errors import WeightsError

#: side of the encoder's input window (voxels) and its patch size
IMAGE_SIZE = 128
PATCH_SIZE = 16
EMBEDDING_GRID = IMAGE_SIZE // PATCH_SIZE
EMBEDDING_CHANNELS = 384
#: side of the dense mask prompt / decoder output
MASK_SIZE = 32
ARCHITECTURE = "SAM-Med3D (medim 'SAM-Med3D', ViT-B vit_b_ori)"
WEIGHTS_NAME = "sam-med3d-turbo"

_INSTALL_HINT = "install it with `pip install medim requests` (spasem's `medim` dependency)"


def build_model() -> torch.nn.Module:
    """The SAM-Med3D architecture with random weights (``medim.create_model("SAM-Med3D")``
    without pretrained weights: nothing is downloaded; medim's console chatter is silenced)."""
    import contextlib
    import io

    try:
        import medim
    except ImportError as exc:
        from spasem.errors import ConfigError

        raise ConfigError(f"SAM-Med3D backends need the package 'medim' ({exc}); {_INSTALL_HINT}") from None
    with contextlib.redirect_stdout(io.StringIO()):
        return medim.create_model("SAM-Med3D", pretrained=False)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of a SAM-Med3D checkpoint: official files hold it under
    ``"model_state_dict"`` (training checkpoints add optimizer state and the arguments); a bare
    state dict is accepted too; a ``module.`` prefix (DataParallel) is removed."""
    from spasem.weights import strip_prefix, torch_load

    obj = torch_load(path, "SAM-Med3D")
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise WeightsError(
            f"checkpoint '{path}' is not a SAM-Med3D checkpoint: expected a dict with 'model_state_dict' "
            f"(or a state dict), got {type(obj).__name__}"
        )
    return strip_prefix(obj)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the architecture and load ``path`` strictly (keys and shapes must match), in eval mode."""
    from spasem.weights import check_state_dict

    state = read_state_dict(path)
    model = build_model()
    check_state_dict(model.state_dict(), state, ARCHITECTURE, path)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


_CACHE: dict[tuple, torch.nn.Module] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(path: str | os.PathLike, device: torch.device | str) -> tuple:
    p = Path(path).resolve()
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns, str(torch.device(device)))


def is_cached(path: str | os.PathLike, device: torch.device | str = "cpu") -> bool:
    """True when :func:`cached_model` would not need to load ``path``."""
    with _CACHE_LOCK:
        return _cache_key(path, device) in _CACHE


def cached_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """:func:`load_model`, shared by the encoder and the decoder: the last loaded checkpoint is
    kept (keyed by file, size, modification time and device)."""
    p = Path(path).resolve()
    key = _cache_key(p, device)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = load_model(p, device)
            _CACHE.clear()
            _CACHE[key] = model
        return model


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


# ------------------------------------------------------------------------------------------
# exact fast path of the windowed encoder blocks
# ------------------------------------------------------------------------------------------
def _rel_pos(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """medim's ``get_rel_pos`` (imported, not re-implemented)."""
    from medim.models.sam_med3d import get_rel_pos

    return get_rel_pos(q_size, k_size, table)


def fast_block_forward(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a medim ``Block3D``, computing windowed attention only for real tokens.

    :param block: a ``Block3D`` (global blocks and grids larger than one window fall back to
        the module's own forward).
    :param x: tokens ``[B, D, H, W, C]``.
    :returns: the block's output ``[B, D, H, W, C]``, equal to ``block(x)`` up to float rounding.
    """
    ws = int(block.window_size)
    b, d, h, w, c = x.shape
    if ws == 0 or max(d, h, w) > ws or not block.attn.use_rel_pos:
        return block(x)
    attn = block.attn
    heads = attn.num_heads
    head_dim = c // heads
    shortcut = x
    xn = block.norm1(x)
    n_real = d * h * w
    qkv = attn.qkv(xn).reshape(b, n_real, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k_real, v_real = qkv.reshape(3, b * heads, n_real, head_dim).unbind(0)
    # a padded token is the zero vector after norm1: its q, k and v are exactly the qkv bias
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias.reshape(3, heads, head_dim).to(q.dtype)
    else:
        bias = torch.zeros(3, heads, head_dim, dtype=q.dtype, device=q.device)
    bias_q, bias_k, bias_v = (part.repeat(b, 1) for part in bias.unbind(0))  # [B*heads, head_dim]
    bh = b * heads
    # q.k for the real keys and for the (single, shared) padded key, in one product
    keys = torch.cat([k_real, bias_k[:, None, :]], dim=1)  # [B*heads, n_real + 1, head_dim]
    base = (q * attn.scale) @ keys.transpose(-2, -1)  # [B*heads, n_real, n_real + 1]
    base_real = base[:, :, :n_real].reshape(bh, d, h, w, d, h, w)
    base_pad = base[:, :, n_real:].reshape(bh, d, h, w, 1, 1, 1)

    # Decomposed relative positions, exactly as medim's add_decomposed_rel_pos broadcasts them
    # (not as the paper writes them): the d term varies along the key's w axis, and the h and
    # w terms read the query row at w = the key's d (resp. h) index, i.e. rows of padded query
    # tokens too, whose q is the qkv bias. Same additions in the same order as the module.
    rd = _rel_pos(ws, ws, attn.rel_pos_d)[:d]
    rh = _rel_pos(ws, ws, attn.rel_pos_h)[:h]
    rw = _rel_pos(ws, ws, attn.rel_pos_w)
    q_grid = q.reshape(bh, d, h, w, head_dim)
    q_rows = bias_q[:, None, None, None, :].expand(bh, d, h, ws, head_dim).clone()
    q_rows[:, :, :, :w] = q_grid
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", q_grid, rd)[:, :, :, :, None, None, :]  # [.., 1, 1, ws]
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", q_rows, rh)[:, :, :, None, :, None, :]  # [.., ws, 1, ws]
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", q_rows, rw)[:, :, :, None, None, :, :]  # [.., 1, ws, ws]
    full = (bh, d, h, w, ws, ws, ws)
    logits = torch.empty(full, dtype=base.dtype, device=base.device)
    torch.add(base_pad.expand(full), rel_d.expand(full), out=logits)
    logits[:, :, :, :, :d, :h, :w] = base_real + rel_d[:, :, :, :, :, :, :w]
    logits += rel_h
    logits += rel_w
    weights = logits.view(bh, n_real, ws**3).softmax(dim=-1)
    values = bias_v[:, None, None, None, :].expand(bh, ws, ws, ws, head_dim).clone()
    values[:, :d, :h, :w] = v_real.reshape(bh, d, h, w, head_dim)
    out = weights @ values.view(bh, ws**3, head_dim)
    out = out.view(b, heads, d, h, w, head_dim).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, c)
    out = attn.proj(out)
    x = shortcut + out
    return x + block.mlp(block.norm2(x))


def encoder_forward(encoder: torch.nn.Module, image: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """Run a medim ``ImageEncoderViT3D`` on ``image`` ``[B, 1, 128, 128, 128]`` ->
    ``[B, 384, 8, 8, 8]``; with ``fast`` the windowed blocks use :func:`fast_block_forward`."""
    if not fast:
        return encoder(image)
    x = encoder.patch_embed(image)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks:
        x = fast_block_forward(blk, x)
    return encoder.neck(x.permute(0, 4, 1, 2, 3))


def decode_dense_prompt(model: torch.nn.Module, embedding: torch.Tensor, mask_prompt: torch.Tensor) -> torch.Tensor:
    """Mask-only prompting: ``embedding`` ``[B, 384, 8, 8, 8]`` and ``mask_prompt`` logits
    ``[B, 1, 32, 32, 32]`` -> low-resolution logits ``[B, 1, 32, 32, 32]`` (no points, no boxes)."""
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=mask_prompt)
    low_res, _iou = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res


def autocast_context(device: torch.device, enabled: bool) -> Any:
    """``torch.autocast`` on CUDA when mixed precision is asked for (bf16 where supported,
    else fp16); a no-op context otherwise (CPU runs in float32)."""
    import contextlib

    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    try:
        bf16 = torch.cuda.is_bf16_supported()
    except (RuntimeError, AssertionError):  # no usable CUDA runtime
        bf16 = False
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def window_prompt(logits: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Window logits ``[D, H, W]`` (128^3) -> dense prompt ``[1, 1, 32, 32, 32]``: clipped to
    ``[-clip, clip]``, then averaged over 4^3 blocks (each prompt voxel covers exactly the
    window voxels it stands for)."""
    x = logits.to(torch.float32)
    if clip is not None:
        x = x.clamp(-clip, clip)
    return F.adaptive_avg_pool3d(x[None, None], (MASK_SIZE, MASK_SIZE, MASK_SIZE))
