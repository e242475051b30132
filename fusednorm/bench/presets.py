"""Named case lists that mirror real work. ``preset(name, device)`` returns the cases.

- ``default``: what ``fusednorm-bench`` runs with no arguments: a few minutes on the machine's device
  (``default_cpu`` on CPU, sized for a 2-core machine; ``default_gpu`` on CUDA).
- ``cpu``: the CPU comparison against torch: LayerNorm/RMSNorm rows 512-8192 x hidden 768-8192, GroupNorm and
  BatchNorm on ResNet/UNet feature maps, InstanceNorm, the fused variants (SwitchableNorm, weight norm of Linear
  and conv weights included); forward and forward+backward; fp32 and bf16.
- ``llm``: transformer norms on GPU: tokens 1K-32K x hidden 1K-16K and very wide rows up to 256K; bf16 and
  the AMP mix; forward, backward, forward+backward; residual-add variants; weight norm of Linear weights.
- ``diffusion``: UNet GroupNorm (+SiLU) maps at batch 1-8, NCHW and channels_last; DiT adaptive LayerNorm.
- ``resnet``: BatchNorm (train and eval) and GroupNorm on ResNet-50 feature maps, NCHW and channels_last; the
  channels-first LayerNorm on ConvNeXt maps; SwitchableNorm (training) on the ResNet-50 maps.
- ``variants``: every fused variant at GPU sizes: residual-add LayerNorm/RMSNorm, channels-first LayerNorm,
  adaptive LayerNorm, SwitchableNorm, and weight norm of Linear and conv weights.
- ``tiny``: every op and mode at toy sizes (tests, smoke runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence

import torch

from fusednorm.bench.cases import Case

ROW_OPS = ("layer_norm", "rms_norm")
FUSED_ROW_OPS = ("add_layer_norm", "add_rms_norm")


def grid(
    ops: Iterable[str],
    shapes: Iterable[Sequence[int]],
    dtypes: Iterable[str],
    modes: Iterable[str],
    layouts: Iterable[str] = ("contiguous",),
    groups: int = 32,
) -> list[Case]:
    """Every combination, in op-major order (so a table groups one op's sizes together)."""
    return [
        Case(op, tuple(shape), dtype, mode, layout, groups)
        for op, dtype, mode, layout, shape in itertools.product(ops, dtypes, modes, layouts, shapes)
    ]


# ---- CPU -----------------------------------------------------------------------------------------------


def default_cpu() -> list[Case]:
    """About 2-4 minutes on a 2-core machine."""
    cases = grid(ROW_OPS, [(2048, 1024), (4096, 4096), (1024, 8192)], ("fp32",), ("forward", "forward+backward"))
    cases += grid(ROW_OPS, [(2048, 1024), (4096, 4096)], ("bf16",), ("forward", "forward+backward"))
    cases += grid(FUSED_ROW_OPS, [(2048, 1024)], ("fp32",), ("forward", "forward+backward"))
    cases += grid(("group_norm",), [(8, 256, 56, 56)], ("fp32",), ("forward", "forward+backward"),
                  ("contiguous", "channels_last"))
    cases += grid(("group_norm",), [(2, 320, 64, 64)], ("fp32", "bf16"), ("forward",))
    cases += grid(("batch_norm_train",), [(32, 64, 56, 56)], ("fp32",), ("forward", "forward+backward"))
    cases += grid(("batch_norm_train",), [(32, 64, 56, 56)], ("fp32",), ("forward",), ("channels_last",))
    cases += grid(("batch_norm_eval",), [(32, 64, 56, 56)], ("fp32",), ("inference",))
    cases += grid(("instance_norm",), [(8, 64, 64, 64)], ("fp32",), ("forward",))
    cases += grid(("layer_norm_2d",), [(8, 96, 56, 56)], ("fp32",), ("forward",))
    cases += grid(("adaptive_layer_norm",), [(4, 1024, 1152)], ("fp32",), ("forward",))
    cases += grid(("switchable_norm",), [(8, 64, 56, 56)], ("fp32",), ("forward+backward",))
    cases += grid(("weight_norm",), [(4096, 4096)], ("fp32",), ("forward+backward",))
    return cases


def cpu() -> list[Case]:
    """The native-CPU vs torch comparison (longer than the default: about 10-20 minutes on 2 cores)."""
    rows = [(512, 768), (2048, 768), (8192, 768), (2048, 1024), (4096, 2048), (1024, 4096), (4096, 4096),
            (512, 8192), (2048, 8192), (8192, 8192)]
    cases = grid(ROW_OPS, rows, ("fp32", "bf16"), ("forward", "forward+backward"))
    cases += grid(FUSED_ROW_OPS, [(2048, 1024), (4096, 4096)], ("fp32", "bf16"), ("forward", "forward+backward"))
    maps = [(8, 256, 56, 56), (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
    cases += grid(("group_norm",), maps, ("fp32", "bf16"), ("forward", "forward+backward"),
                  ("contiguous", "channels_last"))
    cases += grid(("group_norm_silu",), [(2, 320, 64, 64)], ("fp32", "bf16"), ("forward", "forward+backward"))
    bn = [(32, 64, 56, 56), (32, 256, 28, 28), (32, 512, 14, 14)]
    cases += grid(("batch_norm_train",), bn, ("fp32", "bf16"), ("forward", "forward+backward"),
                  ("contiguous", "channels_last"))
    cases += grid(("batch_norm_eval",), bn, ("fp32", "bf16"), ("inference",), ("contiguous", "channels_last"))
    cases += grid(("instance_norm",), [(8, 64, 64, 64), (4, 128, 32, 32)], ("fp32", "bf16"),
                  ("forward", "forward+backward"))
    cases += grid(("layer_norm_2d",), [(8, 96, 56, 56), (8, 384, 14, 14)], ("fp32", "bf16"),
                  ("forward", "forward+backward"), ("contiguous", "channels_last"))
    cases += grid(("adaptive_layer_norm",), [(4, 1024, 1152)], ("fp32", "bf16"), ("forward", "forward+backward"))
    cases += grid(("switchable_norm",), [(8, 64, 56, 56), (8, 256, 28, 28)], ("fp32", "bf16"),
                  ("forward", "forward+backward"))
    # weight norm: a Linear weight (out, in) and a 3x3 conv weight (out, in, kh, kw), normalized per output row
    cases += grid(("weight_norm",), [(4096, 4096), (1024, 4096), (512, 512, 3, 3)], ("fp32", "bf16"),
                  ("forward", "forward+backward"))
    return cases


# ---- GPU -----------------------------------------------------------------------------------------------


def default_gpu() -> list[Case]:
    """A few minutes on one GPU (most of it torch.compile's compile time): the headline shape of each family."""
    rows = [(4096, 4096), (16384, 8192), (4096, 65536)]
    cases = grid(ROW_OPS, rows, ("bf16",), ("forward", "forward+backward"))
    cases += grid(ROW_OPS, [(16384, 8192)], ("bf16",), ("backward",))
    cases += grid(ROW_OPS, [(4096, 4096)], ("fp32", "mixed"), ("forward+backward",))
    cases += grid(FUSED_ROW_OPS, [(16384, 8192)], ("bf16",), ("forward", "forward+backward"))
    cases += grid(("group_norm", "group_norm_silu"), [(2, 320, 64, 64)], ("bf16",),
                  ("forward", "forward+backward"), ("contiguous", "channels_last"))
    cases += grid(("batch_norm_train",), [(32, 256, 56, 56)], ("bf16",), ("forward+backward",),
                  ("contiguous", "channels_last"))
    cases += grid(("batch_norm_eval",), [(32, 256, 56, 56)], ("bf16",), ("inference",))
    cases += grid(("instance_norm",), [(8, 256, 64, 64)], ("bf16",), ("forward+backward",))
    cases += grid(("adaptive_layer_norm",), [(8, 4096, 1152)], ("bf16",), ("forward", "forward+backward"))
    cases += grid(("layer_norm_2d",), [(32, 96, 56, 56)], ("bf16",), ("forward+backward",),
                  ("contiguous", "channels_last"))
    cases += grid(("switchable_norm",), [(32, 256, 56, 56)], ("bf16",), ("forward+backward",))
    cases += grid(("weight_norm",), [(4096, 4096)], ("fp32",), ("forward+backward",))
    return cases


def llm() -> list[Case]:
    """Transformer row norms: tokens 1K-32K x hidden 1K-16K, and very wide rows up to 256K."""
    rows = [(t, h) for t in (1024, 4096, 16384, 32768) for h in (1024, 4096, 8192, 16384)]
    wide = [(1024, 32768), (512, 65536), (256, 131072), (128, 262144)]
    cases = grid(ROW_OPS, rows + wide, ("bf16",), ("forward", "forward+backward"))
    cases += grid(ROW_OPS, [(4096, 4096), (16384, 8192), (512, 65536)], ("bf16",), ("backward", "inference"))
    cases += grid(ROW_OPS, [(4096, 4096), (16384, 8192)], ("mixed", "fp32", "fp16"), ("forward+backward",))
    cases += grid(FUSED_ROW_OPS, [(4096, 4096), (16384, 8192), (32768, 16384)], ("bf16",),
                  ("forward", "forward+backward"))
    # weight-normalized Linear weights (out, in): fp32 master weights (AMP) and pure bf16
    cases += grid(("weight_norm",), [(4096, 4096), (14336, 4096), (4096, 14336)], ("fp32", "bf16"),
                  ("forward", "forward+backward"))
    return cases


def diffusion() -> list[Case]:
    """UNet GroupNorm maps (SD-1.5/SDXL levels) at batch 1-8, NCHW and channels_last, with and without SiLU."""
    levels = [(320, 128), (320, 64), (640, 32), (1280, 16)]
    maps = [(b, c, h, h) for b in (1, 2, 8) for c, h in levels]
    cases = grid(("group_norm_silu",), maps, ("bf16",), ("forward", "forward+backward"),
                 ("contiguous", "channels_last"))
    cases += grid(("group_norm",), [(2, 320, 64, 64), (2, 1280, 16, 16)], ("bf16", "fp16", "fp32", "mixed"),
                  ("forward", "forward+backward"), ("contiguous", "channels_last"))
    # DiT blocks: adaptive LayerNorm over (batch, tokens, hidden)
    dit = [(8, 1024, 1152), (2, 4096, 1152), (4, 4096, 3072)]
    cases += grid(("adaptive_layer_norm",), dit, ("bf16",), ("forward", "forward+backward"))
    return cases


def resnet() -> list[Case]:
    """BatchNorm (train and eval) and GroupNorm on ResNet-50 feature maps at batch 32."""
    maps = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
    layouts = ("contiguous", "channels_last")
    cases = grid(("batch_norm_train",), maps, ("bf16", "fp32"), ("forward", "forward+backward"), layouts)
    cases += grid(("batch_norm_eval",), maps, ("bf16", "fp32"), ("inference",), layouts)
    cases += grid(("group_norm",), maps, ("bf16",), ("forward", "forward+backward"), layouts)
    # ConvNeXt: channels-first LayerNorm on its stage maps
    convnext = [(32, 96, 56, 56), (32, 192, 28, 28), (32, 384, 14, 14), (32, 768, 7, 7)]
    cases += grid(("layer_norm_2d",), convnext, ("bf16",), ("forward", "forward+backward"), layouts)
    # SwitchableNorm in place of ResNet-50's BatchNorm (training)
    cases += grid(("switchable_norm",), maps, ("bf16", "fp32"), ("forward", "forward+backward"))
    return cases


def variants() -> list[Case]:
    """The fused variants (issue 8) at GPU sizes, forward and forward+backward."""
    train = ("forward", "forward+backward")
    cases = grid(FUSED_ROW_OPS, [(4096, 4096), (16384, 8192)], ("bf16",), train)
    cases += grid(("layer_norm_2d",), [(32, 96, 56, 56), (32, 384, 14, 14)], ("bf16",), train,
                  ("contiguous", "channels_last"))
    cases += grid(("adaptive_layer_norm",), [(8, 1024, 1152), (2, 4096, 3072)], ("bf16",), train)
    cases += grid(("switchable_norm",), [(32, 64, 112, 112), (32, 256, 56, 56), (32, 1024, 14, 14)],
                  ("bf16", "fp32"), train)
    # Linear weights (out, in); conv weights (out, in, *kernel): a 3x3 Conv2d and a k=7 Conv1d (vocoders)
    weights = [(4096, 4096), (14336, 4096), (512, 512, 3, 3), (1024, 512, 7)]
    cases += grid(("weight_norm",), weights, ("fp32", "bf16"), train)
    return cases


def tiny() -> list[Case]:
    """Every op and mode at toy sizes: for tests and a quick smoke run."""
    modes = ("forward", "backward", "forward+backward", "inference")
    cases = grid(ROW_OPS + FUSED_ROW_OPS, [(64, 128)], ("fp32",), modes)
    cases += grid(ROW_OPS, [(32, 96)], ("bf16", "fp16", "mixed"), ("forward+backward",))
    cases += grid(("group_norm", "group_norm_silu"), [(2, 8, 5, 5)], ("fp32",), modes,
                  ("contiguous", "channels_last"), groups=4)
    cases += grid(("instance_norm",), [(2, 4, 6, 6)], ("fp32",), modes)
    cases += grid(("batch_norm_train", "batch_norm_eval"), [(4, 6, 5, 5)], ("fp32",), modes,
                  ("contiguous", "channels_last"))
    cases += grid(("layer_norm_2d",), [(2, 6, 4, 5)], ("fp32",), modes, ("contiguous", "channels_last"))
    cases += grid(("adaptive_layer_norm",), [(2, 7, 48)], ("fp32",), modes)
    cases += grid(("switchable_norm",), [(3, 6, 5, 5)], ("fp32",), modes)
    cases += grid(("switchable_norm",), [(2, 8, 4, 4)], ("bf16", "mixed"), ("forward+backward",))
    cases += grid(("weight_norm",), [(12, 40), (6, 3, 3, 3)], ("fp32",), modes)
    cases += grid(("weight_norm",), [(12, 40)], ("bf16", "mixed"), ("forward+backward",))
    return cases


PRESETS: dict[str, Callable[[], list[Case]]] = {
    "default_cpu": default_cpu,
    "default_gpu": default_gpu,
    "cpu": cpu,
    "llm": llm,
    "diffusion": diffusion,
    "resnet": resnet,
    "variants": variants,
    "tiny": tiny,
}


def preset_names() -> list[str]:
    return ["default", *PRESETS]


def preset(name: str, device: torch.device | str = "cpu") -> list[Case]:
    """The cases of preset ``name``; ``default`` picks ``default_gpu`` on CUDA, else ``default_cpu``."""
    if name == "default":
        name = "default_gpu" if torch.device(device).type == "cuda" else "default_cpu"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    return PRESETS[name]()
