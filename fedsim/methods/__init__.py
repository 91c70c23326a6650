"""Aggregation methods, one file each, behind the interface of ``fedsim.methods.base.Method``.

``build_method(name, settings)`` is the registry; the runtime never asks which method it runs.
"""

from fedsim.errors import UsageError
from fedsim.methods.base import Method, MethodSettings, RoundResult, State, Upload, nbytes
from fedsim.methods.central import Central
from fedsim.methods.fed_sb import FedSB
from fedsim.methods.fedex_lora import FedExLoRA
from fedsim.methods.fedit import FedIT
from fedsim.methods.fedsa_lora import FedSALoRA
from fedsim.methods.fedsvd import FedSVD
from fedsim.methods.ffa_lora import FFALoRA
from fedsim.methods.flexlora import FlexLoRA
from fedsim.methods.flora import FLoRA
from fedsim.methods.fra_lora import FRALoRA
from fedsim.methods.fra_then_ffa import FRAThenFFA
from fedsim.methods.hetlora import HetLoRA
from fedsim.methods.lora_fair import LoRAFAIR
from fedsim.methods.rolora import RoLoRA

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FedSB, FedIT, FedExLoRA, FFALoRA, FLoRA, FRALoRA, FRAThenFFA, FedSALoRA, RoLoRA, FedSVD, FlexLoRA, HetLoRA,
                LoRAFAIR, Central)
}
METHOD_NAMES = tuple(METHODS)


def build_method(name: str, settings: MethodSettings) -> Method:
    if name not in METHODS:
        raise UsageError(f"method.name: unknown method '{name}'; valid: {', '.join(METHOD_NAMES)}")
    return METHODS[name](settings)


__all__ = ["METHODS", "METHOD_NAMES", "Method", "MethodSettings", "RoundResult", "State", "Upload", "build_method", "nbytes"]
