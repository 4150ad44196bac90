"""The CPU facts ONNX Runtime's integer GEMMs depend on, and the integer formats that are exact on a CPU.

ONNX Runtime's MLAS picks its u8 x s8 GEMM kernel by the instruction set at run time. With AVX512-VNNI,
AVX-VNNI (VPDPBUSD) or AMX-INT8 the products accumulate in int32: exact. On x86 CPUs without them (AVX2,
or AVX512BW without VNNI) it uses VPMADDUBSW, which adds *pairs* of u8 x s8 products in int16 and
saturates: activation code 255 times weight code 127, twice, is 64,770 > 32,767. MLAS's u8 x u8 kernels
widen both operands to int16 first (VPMADDWD into int32) and are exact on every x86 CPU. So where u8 x s8
is not exact, the ort-cpu backend stores each INT8 weight as uint8 with zero point 128: the same values.
Other architectures (Arm's SDOT/UDOT, widening multiplies) accumulate in int32 and are exact.
"""

import platform
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

# instruction-set flags (as /proc/cpuinfo spells them) that decide which integer kernels MLAS runs
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class CpuFacts:
    vendor: str
    model: str
    machine: str  # platform.machine(): x86_64, aarch64, ...
    flags: tuple[str, ...]  # the subset of ISA_FLAGS this CPU has

    @property
    def x86(self) -> bool:
        return self.machine.lower() in X86

    @property
    def exact_u8s8(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 integer GEMM accumulates without int16 saturation here."""
        return not self.x86 or any(f in self.flags for f in EXACT_U8S8_FLAGS)

    @property
    def weight_format(self) -> str:
        """The INT8 weight format the ort-cpu backend builds for this CPU: 's8' (u8 x s8 kernels) or 'u8'."""
        return "s8" if self.exact_u8s8 else "u8"

    def describe(self) -> str:
        """E.g. 'AMD EPYC (x86_64: AVX2; no AVX512, no VNNI, no AMX)'."""
        if not self.x86:
            return f"{self.model} ({self.machine})"
        has = set(self.flags)
        vnni = [name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI")) if flag in has]
        parts = ["AVX2" if "avx2" in has else "no AVX2",
                 ("AVX512-BW" if "avx512bw" in has else "AVX512") if "avx512f" in has else "no AVX512",
                 " + ".join(vnni) or "no VNNI", "AMX-INT8" if "amx_int8" in has else "no AMX"]
        return f"{self.model} ({self.machine}: {', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"flags": list(self.flags), "exact_u8s8": self.exact_u8s8, "weight_format": self.weight_format}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CpuFacts":
        return cls(str(d["vendor"]), str(d["model"]), str(d["machine"]), tuple(d["flags"]))


def parse_proc_cpuinfo(text: str, machine: str) -> CpuFacts:
    """CpuFacts from the text of Linux's /proc/cpuinfo (its first processor's entry)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    model = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or "unknown CPU"
    vendor = fields.get("vendor_id") or fields.get("CPU implementer") or "unknown"
    return CpuFacts(vendor, model, machine, tuple(f for f in ISA_FLAGS if f in flags))


@cache
def detect() -> CpuFacts:
    """This machine's CPU: Linux's /proc/cpuinfo (the kernel's view, which also clears flags the OS does
    not enable), elsewhere py-cpuinfo (it runs CPUID; about a second, so only then)."""
    machine = platform.machine()
    proc = Path("/proc/cpuinfo")
    if proc.is_file():
        return parse_proc_cpuinfo(proc.read_text(errors="replace"), machine)
    import cpuinfo

    info = cpuinfo.get_cpu_info()
    flags = {f.replace("avx512vnni", "avx512_vnni").replace("avxvnni", "avx_vnni") for f in info.get("flags", [])}
    return CpuFacts(info.get("vendor_id_raw", "unknown"), info.get("brand_raw", "unknown CPU"), machine,
                    tuple(f for f in ISA_FLAGS if f in flags))
