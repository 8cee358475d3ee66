"""Lightning callbacks: thin adapters over the method cores in ``cl_plugins``."""

from callbacks.base import ContinualCallback, get_stream
from callbacks.der import DER, DERPP
from callbacks.drtune import DRTune
from callbacks.ewc import OnlineEWC
from callbacks.injection import InjectionCallback
from callbacks.joint import JointTraining
from callbacks.kfpf import FPF, KFPF
from callbacks.l2m import L2M
from callbacks.lora import LoRA
from callbacks.loramoe import LoRAMoE
from callbacks.lwf import LwF
from callbacks.metrics import ContinualMetrics
from callbacks.pego import PEGO
from callbacks.replay import ExperienceReplay
from callbacks.si import SynapticIntelligence

__all__ = [
    "DER",
    "DERPP",
    "DRTune",
    "FPF",
    "KFPF",
    "L2M",
    "LwF",
    "OnlineEWC",
    "PEGO",
    "SynapticIntelligence",
    "ContinualCallback",
    "ContinualMetrics",
    "ExperienceReplay",
    "InjectionCallback",
    "JointTraining",
    "LoRA",
    "LoRAMoE",
    "get_stream",
]
