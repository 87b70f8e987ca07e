"""What this machine offers a run: GPU, its memory and bf16 support, processes, and optional libraries."""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass

from dreambooth.errors import UserError


def launched_processes() -> int:
    """Processes of this launch, known before the Accelerator exists (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the Hugging Face cache only (any value but empty or 0)."""
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require_peft() -> None:
    """LoRA layers come from peft, an optional dependency: say how to get it instead of failing on import."""
    if not has_package("peft"):
        raise UserError("LoRA needs the peft package: pip install peft (or pip install -e '.[lora]')")


def gpu_memory_gib() -> float | None:
    """Total memory of GPU 0 in GiB; None without CUDA."""
    import torch  # here, not at module level: loading a config must stay fast (about 0.1 s)

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def device_name() -> str:
    """GPU 0's name and compute capability (compiled kernels are built for it), or the CPU's architecture."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} sm{major}{minor}"
    return f"cpu {platform.machine()}"


@dataclass(frozen=True)
class Machine:
    """The facts that `auto` choices depend on; tests build one by hand to plan for another machine."""
    cuda: bool = False
    gpu_gib: float | None = None  # total memory of GPU 0 in GiB
    bf16: bool = True  # bf16 arithmetic (any CPU; Ampere or newer GPUs)
    processes: int = 1
    triton: bool = False
    bitsandbytes: bool = False
    device_name: str = "cpu"  # the GPU's name and compute capability, or the CPU's architecture
    torch_version: str = ""

    @classmethod
    def detect(cls) -> "Machine":
        import torch  # here, not at module level: loading a config must stay fast (about 0.1 s)

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, gpu_gib=gpu_memory_gib(), bf16=not cuda or torch.cuda.is_bf16_supported(),
                   processes=launched_processes(),
                   triton=has_package("triton"), bitsandbytes=has_package("bitsandbytes"),
                   device_name=device_name(), torch_version=torch.__version__)

    def describe(self) -> str:
        return f"a {self.gpu_gib:.1f} GiB GPU" if self.gpu_gib is not None else "no GPU"
